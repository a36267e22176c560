from oncepay.cli import main

main()
