from damselfly.cli import main

main()
