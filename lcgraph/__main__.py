from lcgraph.app.cli import main

main()
