from pctop.cli import main

main()
