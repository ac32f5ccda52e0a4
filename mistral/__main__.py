from mistral.main import main

main()
