// PM2: N replicas of `python -m server`, one port each (docs/production.md).
//   pm2 start deploy/ecosystem.config.js     (from anywhere; paths are relative to this file)
// Settings, from the environment pm2 is started with:
//   ROADWORK_REPLICAS   replicas (default 3)
//   ROADWORK_BASE_PORT  first replica's port; replica i uses base + i (default 8101: the miner's axon has 8091)
//   ROADWORK_DEVICES    comma-separated devices handed out round-robin, e.g. "cuda:0,cuda:1" (default "cpu")
//   ROADWORK_PYTHON     the Python that has the project installed (default "python3")
//   ROADWORK_LOG_DIR    where each replica's out/err logs go (default ~/.pm2/logs)
// Every other server option passes through as its own ROADWORK_<OPTION> variable (python -m server --help), e.g.
// ROADWORK_MODEL=/srv/bundle ROADWORK_REDIS_URL=redis://127.0.0.1:6379/0 pm2 start deploy/ecosystem.config.js
const os = require("os");
const path = require("path");

const env = process.env;
const replicas = parseInt(env.ROADWORK_REPLICAS || "3", 10);
const basePort = parseInt(env.ROADWORK_BASE_PORT || "8101", 10);
const devices = (env.ROADWORK_DEVICES || "cpu").split(",").map((d) => d.trim()).filter(Boolean);
const logDir = env.ROADWORK_LOG_DIR || path.join(env.PM2_HOME || path.join(os.homedir(), ".pm2"), "logs");
if (!(replicas >= 1) || !(basePort > 0)) {
  throw new Error(`ROADWORK_REPLICAS (${env.ROADWORK_REPLICAS}) and ROADWORK_BASE_PORT (${env.ROADWORK_BASE_PORT}) ` +
                  "must be positive integers");
}
// CPU replicas share the cores: each gets its slice for torch's threads unless OMP_NUM_THREADS is set.
const cpuThreads = String(Math.max(1, Math.floor(os.cpus().length / replicas)));

module.exports = {
  apps: Array.from({ length: replicas }, (_, i) => {
    const device = devices[i % devices.length];
    return {
      name: `roadwork-${i + 1}`,
      script: env.ROADWORK_PYTHON || "python3",
      args: ["-m", "server"],
      interpreter: "none",
      cwd: path.resolve(__dirname, ".."),
      env: {
        ROADWORK_PORT: String(basePort + i),
        ROADWORK_DEVICE: device,
        // Behind nginx every connection comes from the proxy: nginx's limit_req caps each client instead.
        ROADWORK_MAX_CONNECTIONS_PER_IP: env.ROADWORK_MAX_CONNECTIONS_PER_IP || "1024",
        OMP_NUM_THREADS: env.OMP_NUM_THREADS || (device === "cpu" ? cpuThreads : "1"),
      },
      autorestart: true,
      restart_delay: 1000,             // ms before a crashed replica starts again
      exp_backoff_restart_delay: 200,  // ...growing while it keeps crashing
      max_restarts: 20,                // crashes within min_uptime of a start; beyond: pm2 gives up (alerts fire)
      min_uptime: "20s",
      kill_timeout: 35000,             // SIGTERM drains for up to 30 s (--shutdown-timeout-s) before SIGKILL
      out_file: path.join(logDir, `roadwork-${i + 1}.out.log`),
      error_file: path.join(logDir, `roadwork-${i + 1}.err.log`),
      time: true,
    };
  }),
};
