"""tide core: models, draft head, speculative loop, records. Imports no ray/redis/wandb."""
