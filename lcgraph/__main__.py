from lcgraph.cli import main

main()
