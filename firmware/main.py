import runtime

runtime.main()
