from hftune.run import main

main()
