from dcn_inspect.cli import run

run()
