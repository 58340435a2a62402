from forgetdiag.cli import main

main()
