from dcn_inspect.cli import main

main()
