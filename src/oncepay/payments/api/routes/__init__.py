"""One module-level ``APIRouter`` per resource."""
