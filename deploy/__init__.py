"""The production stack: nginx, Redis, Prometheus, Alertmanager, Grafana, PM2 and Docker files for the server, and
`python -m deploy` to render them and to run the stack on one machine (docs/production.md)."""
