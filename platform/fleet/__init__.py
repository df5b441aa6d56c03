"""A fleet of personal devices orchestrated by Flower: each device personalizes its own M
against a shared backbone service, and only scalar metrics travel back to the orchestrator."""
