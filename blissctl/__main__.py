from blissctl.cli import main

main()
