//! A baton cluster in a lab: one `baton node` process per lab node, with
//! generated configuration files, driven through each node's control
//! socket (JSON lines, as `baton ctl` speaks). Used by the demo, the tests
//! and the benchmarks. Keys for the authenticated peer connections are
//! made with `baton key` at start: one per node and one cluster key, in
//! the nodes' state directories.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Lab, LabError, Role};

/// Port of every node's peer listener.
pub const PEER_PORT: u16 = 7700;

/// A service to configure on every node.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub kind: String,
    pub vip: IpAddr,
    pub prefix_len: u8,
    pub ports: Vec<u16>,
    pub preferred_node: String,
    /// Served from the replicated log, a hot clone on every node.
    pub replicated: bool,
}

/// Node settings the cluster writes into every node's configuration.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// VRRP router id: VIPs ride its virtual MAC.
    pub vrid: Option<u8>,
    /// The replicated log's election timeout, if not the default.
    pub election_timeout_ms: Option<u64>,
}

/// A running cluster; dropping it stops the nodes (and the lab, if owned).
pub struct Cluster {
    pub lab: Lab,
    bin: PathBuf,
    services: Vec<ServiceSpec>,
    options: NodeOptions,
    /// Running nodes' daemons; a lock so that faults need only `&self`
    /// (a test watches the lab meanwhile).
    pids: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Every node's public key (hex), as `baton key node` printed it.
    public_keys: BTreeMap<String, String>,
    keep: bool,
}

impl Cluster {
    /// Writes a configuration for every node of `lab` and starts
    /// `bin node --config ...` in each; returns once all answer.
    pub fn start(lab: Lab, bin: &Path, services: &[ServiceSpec]) -> Result<Cluster, LabError> {
        Cluster::start_with(lab, bin, services, NodeOptions::default())
    }

    /// [`Cluster::start`] with node settings of its own.
    pub fn start_with(
        lab: Lab,
        bin: &Path,
        services: &[ServiceSpec],
        options: NodeOptions,
    ) -> Result<Cluster, LabError> {
        let mut cluster = Cluster {
            lab,
            bin: bin.to_owned(),
            services: services.to_vec(),
            options,
            pids: std::sync::Mutex::new(BTreeMap::new()),
            public_keys: BTreeMap::new(),
            keep: false,
        };
        let nodes: Vec<String> = cluster.node_names();
        cluster.make_keys(&nodes)?;
        for node in &nodes {
            cluster.start_node(node)?;
        }
        for node in &nodes {
            cluster.wait_ready(node, Duration::from_secs(10))?;
        }
        Ok(cluster)
    }

    fn node_names(&self) -> Vec<String> {
        self.lab
            .hosts()
            .iter()
            .filter(|h| h.role == Role::Node)
            .map(|h| h.name.clone())
            .collect()
    }

    /// Runs `baton ARGS` here and returns its standard output.
    fn baton(&self, args: &[&std::ffi::OsStr]) -> Result<String, LabError> {
        let out = std::process::Command::new(&self.bin).args(args).output()?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("baton {args:?}"),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A key pair per node and one cluster key (copied to every node).
    fn make_keys(&mut self, nodes: &[String]) -> Result<(), LabError> {
        let mut cluster_key: Option<PathBuf> = None;
        for node in nodes {
            let dir = self.lab.state_dir(node)?;
            std::fs::create_dir_all(&dir)?;
            let key = self.key_file(node)?;
            let _ = std::fs::remove_file(&key);
            let public = self.baton(&["key".as_ref(), "node".as_ref(), key.as_os_str()])?;
            self.public_keys.insert(node.clone(), public);
            let shared = self.cluster_key_file(node)?;
            let _ = std::fs::remove_file(&shared);
            match &cluster_key {
                None => {
                    self.baton(&["key".as_ref(), "cluster".as_ref(), shared.as_os_str()])?;
                    cluster_key = Some(shared);
                }
                // A copy keeps the mode (600).
                Some(first) => {
                    std::fs::copy(first, &shared)?;
                }
            }
        }
        Ok(())
    }

    /// `node`'s private key file.
    pub fn key_file(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(self.lab.state_dir(node)?.join("node.key"))
    }

    /// The cluster key file, as `node` has it.
    pub fn cluster_key_file(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(self.lab.state_dir(node)?.join("cluster.key"))
    }

    /// `node`'s public key (hex).
    pub fn public_key(&self, node: &str) -> Option<&str> {
        self.public_keys.get(node).map(String::as_str)
    }

    /// The configuration file of `node`.
    pub fn config_path(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(self.lab.state_dir(node)?.join("node.toml"))
    }

    fn control_socket(&self, node: &str) -> Result<PathBuf, LabError> {
        Ok(self.lab.state_dir(node)?.join("control.sock"))
    }

    fn write_config(&self, node: &str) -> Result<PathBuf, LabError> {
        let dir = self.lab.state_dir(node)?;
        std::fs::create_dir_all(&dir)?;
        let mut text = format!(
            "node = \"{node}\"\ninterface = \"eth0\"\nstate_dir = \"{}\"\nkey_file = \"{}\"\ncluster_key_file = \"{}\"\n\n[peers]\n",
            dir.display(),
            self.key_file(node)?.display(),
            self.cluster_key_file(node)?.display(),
        );
        if let Some(vrid) = self.options.vrid {
            text.insert_str(0, &format!("vrid = {vrid}\n"));
        }
        if let Some(ms) = self.options.election_timeout_ms {
            text.insert_str(0, &format!("election_timeout_ms = {ms}\n"));
        }
        for h in self.lab.hosts().iter().filter(|h| h.role == Role::Node) {
            let addr = std::net::SocketAddr::new(IpAddr::V4(h.ipv4), PEER_PORT);
            text.push_str(&format!("{} = \"{addr}\"\n", h.name));
        }
        text.push_str("\n[public_keys]\n");
        for (name, key) in &self.public_keys {
            text.push_str(&format!("{name} = \"{key}\"\n"));
        }
        for s in &self.services {
            text.push_str(&format!(
                "\n[[services]]\nname = \"{}\"\nkind = \"{}\"\nvip = \"{}/{}\"\nports = [{}]\npreferred_node = \"{}\"\nreplicated = {}\n",
                s.name,
                s.kind,
                s.vip,
                s.prefix_len,
                s.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
                s.preferred_node,
                s.replicated,
            ));
        }
        let path = dir.join("node.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts (or restarts) the node process of `node`; its log goes to
    /// `node.log` in its state directory.
    pub fn start_node(&self, node: &str) -> Result<(), LabError> {
        let config = self.write_config(node)?;
        let log = std::fs::File::create(self.lab.state_dir(node)?.join("node.log"))?;
        let mut cmd = self.lab.command(node, &self.bin.to_string_lossy())?;
        cmd.arg("node")
            .arg("--config")
            .arg(&config)
            .env(
                "BATON_LOG",
                std::env::var("BATON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        let pid = self.lab.spawn(cmd)?;
        self.pids().insert(node.to_owned(), pid);
        Ok(())
    }

    /// Waits until `node` answers on its control socket.
    pub fn wait_ready(&self, node: &str, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.request(node, &json!({"op": "status"})).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.lab.state_dir(node)?.join("node.log"))
                    .unwrap_or_default();
                return Err(LabError::Command {
                    command: format!("baton node on {node}"),
                    detail: format!(
                        "not ready after {timeout:?}; log: {}",
                        log.lines().last().unwrap_or("(empty)")
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one control request to `node` and returns its JSON answer.
    pub fn request(&self, node: &str, request: &Value) -> Result<Value, LabError> {
        let socket = self.control_socket(node)?;
        let mut stream = UnixStream::connect(&socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        serde_json::from_str(&answer).map_err(|e| LabError::Command {
            command: format!("control request to {node}"),
            detail: format!("unreadable answer {answer:?}: {e}"),
        })
    }

    /// Asks `via` to move `service` to `to`; Ok(freeze_ms) or the node's
    /// error message.
    pub fn move_service(&self, via: &str, service: &str, to: &str) -> Result<f64, String> {
        let answer = self
            .request(via, &json!({"op": "move", "service": service, "to": to}))
            .map_err(|e| e.to_string())?;
        match answer.get("result").and_then(Value::as_str) {
            Some("moved") => Ok(answer["freeze_ms"].as_f64().unwrap_or(0.0)),
            _ => Err(answer["message"]
                .as_str()
                .unwrap_or("unknown error")
                .to_owned()),
        }
    }

    /// The node running `service`, as `via` sees the cluster.
    pub fn running_on(&self, via: &str, service: &str) -> Option<String> {
        let status = self.request(via, &json!({"op": "status"})).ok()?;
        status["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)?["running_on"]
            .as_str()
            .map(str::to_owned)
    }

    /// Stops `node`'s process with SIGTERM (a clean shutdown) and waits;
    /// returns whether it exited by itself, with status 0.
    pub fn stop_node(&self, node: &str) -> bool {
        let pid = self.pids().remove(node);
        match pid {
            Some(pid) => self
                .lab
                .stop(pid, Duration::from_secs(5))
                .is_some_and(|s| s.success()),
            None => false,
        }
    }

    /// Kills `node`'s daemon with SIGKILL (`kill -9`): nothing of it runs
    /// any cleanup. Returns whether it was running.
    pub fn kill_node(&self, node: &str) -> bool {
        let pid = self.pids().remove(node);
        match pid {
            Some(pid) => self.lab.kill(pid).is_some(),
            None => false,
        }
    }

    fn pids(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        self.pids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Process id of `node`'s daemon.
    pub fn pid(&self, node: &str) -> Option<u32> {
        self.pids().get(node).copied()
    }

    /// The log `node` wrote so far.
    pub fn node_log(&self, node: &str) -> String {
        self.lab
            .state_dir(node)
            .ok()
            .and_then(|d| std::fs::read_to_string(d.join("node.log")).ok())
            .unwrap_or_default()
    }
}

impl Cluster {
    /// Leaves the lab and its nodes running after this handle is gone;
    /// `baton lab down` removes them.
    pub fn keep(mut self) {
        self.keep = true;
        self.lab.keep_running();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let nodes: Vec<String> = self.pids().keys().cloned().collect();
        for node in nodes {
            let _ = self.stop_node(&node);
        }
    }
}
