if __name__ == "__main__":  # not when a spawned process (the MLflow logger) imports this main module
    from orchestrator.cli import main

    main()
