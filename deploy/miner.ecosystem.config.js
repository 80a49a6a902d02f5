// PM2 entry for the subnet-72 miner, next to the roadwork server(s): `pm2 start deploy/miner.ecosystem.config.js`.
// The miner is light (no model in this mode): it forwards each ImageSynapse to SERVER_URL (one server, or nginx in
// front of the replicas). Wallet, hotkey and network come from the environment below; see README "Mining on subnet 72".
const env = (name, fallback) => process.env[name] || fallback;

module.exports = {
  apps: [
    {
      name: "roadwork-miner",
      script: "python",
      args: [
        "-m", "miner",
        "--netuid", env("NETUID", "72"),
        "--subtensor.network", env("SUBTENSOR_NETWORK", "finney"),
        "--wallet.name", env("WALLET_NAME", "default"),
        "--wallet.hotkey", env("WALLET_HOTKEY", "default"),
        "--axon.port", env("AXON_PORT", "8091"),
        "--server-url", env("SERVER_URL", "http://127.0.0.1:8080"),
        "--metrics-host", "127.0.0.1",
        "--metrics-port", env("MINER_METRICS_PORT", "9091"),
      ],
      interpreter: "none",
      cwd: __dirname + "/..",
      autorestart: true,
      max_restarts: 50,
      restart_delay: 5000,
      kill_timeout: 15000, // SIGTERM: the miner closes its axon and session, then exits 0
    },
  ],
};
