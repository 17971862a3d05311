from lorablend.cli import main

main()
