//! The authenticated cluster listener, attacked for real: three `baton
//! node` processes in a lab, and an attacker on a client host (plain
//! frames, another cluster's keys, a stolen key claiming another name,
//! recorded exchanges replayed or altered). Nothing an attacker sends may
//! be acted on, each refusal is counted and logged once, and the cluster
//! keeps serving. Needs root, iproute2, iptables and redis-tools.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use baton_lab::cluster::{Cluster, ServiceSpec, PEER_PORT};
use baton_lab::Lab;
use baton_node::control::{PeerReply, PeerRequest, PEER_MAGIC, PEER_VERSION};
use baton_node::peer::{keys, KernelSettings, PeerAuth, PublicKey, Secret};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const BIN: &str = env!("CARGO_BIN_EXE_baton");
const KV_PORT: u16 = 6379;
/// Every exchange with a node in these tests ends within this.
const STEP: Duration = Duration::from_secs(10);

fn vip() -> IpAddr {
    IpAddr::V4(Lab::vip(1).0)
}

fn cluster(prefix: &str) -> Cluster {
    let lab = Lab::create(&Lab::unique_name(prefix), 3, 2).unwrap();
    start(lab)
}

fn start(lab: Lab) -> Cluster {
    let kv = ServiceSpec {
        name: "kv".into(),
        kind: "kv".into(),
        vip: vip(),
        prefix_len: 16,
        ports: vec![KV_PORT],
        preferred_node: "node1".into(),
        replicated: false,
    };
    Cluster::start(lab, Path::new(BIN), &[kv]).unwrap()
}

fn node_addr(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4([198, 18, 1, i].into()), PEER_PORT)
}

fn redis_cli(c: &Cluster, host: &str, args: &[&str]) -> String {
    let out = c
        .lab
        .command(host, "timeout")
        .unwrap()
        .args(["10", "redis-cli", "-h", &vip().to_string(), "-p"])
        .arg(KV_PORT.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The cluster still serves: kv answers through the VIP from node1.
fn still_serving(c: &Cluster, key: &str, value: &str) {
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node1"));
    assert_eq!(redis_cli(c, "client2", &["GET", key]), value);
}

fn refused(c: &Cluster, node: &str) -> u64 {
    c.request(node, &json!({"op": "status"})).unwrap()["refused_peer_connections"]
        .as_u64()
        .unwrap()
}

fn refusal_lines(c: &Cluster, node: &str, reason: &str) -> usize {
    c.node_log(node)
        .lines()
        .filter(|l| l.contains("refused a peer connection") && l.contains(reason))
        .count()
}

/// Waits (bounded) for `node` to have counted at least `n` refusals.
fn wait_refused(c: &Cluster, node: &str, n: u64) -> u64 {
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let got = refused(c, node);
        if got >= n || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a tokio runtime inside `host`'s namespace, with a deadline.
fn in_host<T, F, Fut>(c: &Cluster, host: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    c.lab
        .run_in(host, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move { tokio::time::timeout(STEP * 3, f()).await.expect("deadline") })
        })
        .unwrap()
}

/// Sends `bytes` to `addr` and returns what came back until the node
/// closed the connection (bounded).
async fn send_raw(addr: SocketAddr, bytes: Vec<u8>) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut back)).await;
    back
}

fn secret(path: &Path, label: &str) -> Secret {
    keys::load_secret(path, label).unwrap()
}

fn public(c: &Cluster, node: &str) -> PublicKey {
    c.public_key(node).unwrap().parse().unwrap()
}

/// Credentials for an attacker calling itself `name`, with `private` and
/// `psk`, who knows node1's address and public key.
fn attacker(c: &Cluster, name: &str, private: Secret, psk: Secret) -> Arc<PeerAuth> {
    let mut peers = BTreeMap::new();
    peers.insert("node1".to_string(), (node_addr(1), public(c, "node1")));
    Arc::new(PeerAuth::new(
        name.into(),
        private,
        psk,
        peers,
        KernelSettings::default(),
    ))
}

/// Connects as `auth` to node1 and asks `req`; the answer or the error.
async fn ask(auth: Arc<PeerAuth>, req: PeerRequest) -> Result<PeerReply, String> {
    let mut s = auth
        .connect("node1", None)
        .await
        .map_err(|e| e.to_string())?;
    baton_node::control::write_peer(&mut s, &req)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(STEP, baton_node::control::read_peer::<PeerReply, _>(&mut s))
        .await
        .map_err(|_| "no answer".to_string())?
}

fn move_to(to: &str) -> PeerRequest {
    PeerRequest::Move {
        service: "kv".into(),
        to: to.into(),
    }
}

#[test]
fn a_plain_move_frame_from_a_client_moves_nothing_and_is_logged_once() {
    let c = cluster("aup");
    assert_eq!(redis_cli(&c, "client2", &["SET", "k", "v"]), "OK");
    let before = refused(&c, "node1");
    let frame = baton_core::wire::encode(PEER_MAGIC, PEER_VERSION, &move_to("node2"));
    let back = in_host(&c, "client1", move || send_raw(node_addr(1), frame));
    assert!(back.is_empty(), "the node answered a plain frame: {back:?}");
    // The same again, and a plain move Offer: counted, not logged again.
    let frame = baton_core::wire::encode(PEER_MAGIC, PEER_VERSION, &move_to("node3"));
    in_host(&c, "client1", move || send_raw(node_addr(1), frame));
    let offer = baton_core::wire::encode(baton_core::relocation::MAGIC, 1, &0u64);
    in_host(&c, "client1", move || send_raw(node_addr(1), offer));
    assert_eq!(wait_refused(&c, "node1", before + 3), before + 3);
    still_serving(&c, "k", "v");
    assert_eq!(
        refusal_lines(&c, "node1", "unauthenticated plain frame"),
        1,
        "{}",
        c.node_log("node1")
    );
    assert!(c.node_log("node1").contains("198.18.2.1"));
    for l in c
        .node_log("node1")
        .lines()
        .filter(|l| l.contains("refused"))
    {
        eprintln!("node1: {l}");
    }

    // Keys never show: not in logs, not in ctl status.
    let status = Command::new(BIN)
        .args(["ctl", "--config"])
        .arg(c.config_path("node1").unwrap())
        .args(["status", "--json"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains("\"refused_peer_connections\":"), "{status}");
    for node in ["node1", "node2", "node3"] {
        let private = std::fs::read_to_string(c.key_file(node).unwrap()).unwrap();
        let psk = std::fs::read_to_string(c.cluster_key_file(node).unwrap()).unwrap();
        for s in [&private, &psk] {
            let hex = s.split_whitespace().nth(1).unwrap();
            for n in ["node1", "node2", "node3"] {
                assert!(!c.node_log(n).contains(hex), "a key in {n}'s log");
            }
            assert!(!status.contains(hex), "a key in ctl status");
        }
    }
}

#[test]
fn another_clusters_keys_cannot_query_move_or_join() {
    let c = cluster("auk");
    assert_eq!(redis_cli(&c, "client2", &["SET", "k", "v"]), "OK");
    let before = refused(&c, "node1");
    let (stranger, _) = keys::generate_node_key().unwrap();
    let other_psk = Secret::random().unwrap();
    let node2_key = secret(&c.key_file("node2").unwrap(), keys::NODE_KEY_LABEL);
    let cases = [
        // Another cluster's node and key.
        attacker(&c, "node2", stranger.clone(), other_psk.clone()),
        // Our cluster's key, a stranger's node key.
        attacker(
            &c,
            "node2",
            stranger,
            secret(
                &c.cluster_key_file("node1").unwrap(),
                keys::CLUSTER_KEY_LABEL,
            ),
        ),
        // A node key of this cluster, another cluster's key.
        attacker(&c, "node2", node2_key, other_psk),
    ];
    for (i, auth) in cases.into_iter().enumerate() {
        for req in [PeerRequest::Status, move_to("node3")] {
            let a = auth.clone();
            let r = in_host(&c, "client1", move || ask(a, req));
            assert!(r.is_err(), "case {i}: answered {r:?}");
        }
    }
    assert!(wait_refused(&c, "node1", before + 6) >= before + 6);
    still_serving(&c, "k", "v");

    // A whole node of another cluster on client2: it sees nobody, cannot
    // move the service to itself, and the cluster goes on.
    let dir = std::env::temp_dir().join(format!("baton-au-rogue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("node.key");
    let psk = dir.join("cluster.key");
    let out = Command::new(BIN)
        .arg("key")
        .arg("node")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rogue_public = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(Command::new(BIN)
        .arg("key")
        .arg("cluster")
        .arg(&psk)
        .status()
        .unwrap()
        .success());
    let mut text = format!(
        "node = \"node4\"\ninterface = \"eth0\"\nstate_dir = \"{}\"\nkey_file = \"{}\"\ncluster_key_file = \"{}\"\n[peers]\n",
        dir.display(),
        key.display(),
        psk.display()
    );
    for i in 1..=3u8 {
        text.push_str(&format!("node{i} = \"{}\"\n", node_addr(i)));
    }
    text.push_str(&format!(
        "node4 = \"198.18.2.2:{PEER_PORT}\"\n[public_keys]\n"
    ));
    for n in ["node1", "node2", "node3"] {
        text.push_str(&format!("{n} = \"{}\"\n", c.public_key(n).unwrap()));
    }
    text.push_str(&format!(
        "node4 = \"{rogue_public}\"\n[[services]]\nname = \"kv\"\nkind = \"kv\"\nvip = \"{}/16\"\nports = [{KV_PORT}]\npreferred_node = \"node1\"\n",
        vip()
    ));
    let config = dir.join("node.toml");
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let mut cmd = c.lab.command("client2", BIN).unwrap();
    cmd.arg("node")
        .arg("--config")
        .arg(&config)
        .env("BATON_LOG", "info")
        .stderr(log);
    let pid = c.lab.spawn(cmd).unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("20")
            .arg(BIN)
            .args(["ctl", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let deadline = std::time::Instant::now() + STEP;
    let status = loop {
        let (ok, out) = ctl(&["status", "--json"]);
        if ok || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status: serde_json::Value = serde_json::from_str(status.trim()).expect(&status);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["up"], n["name"] == "node4", "rogue sees {n}");
    }
    let (ok, out) = ctl(&["move", "kv", "--to", "node4"]);
    assert!(!ok, "the rogue moved kv: {out}");
    still_serving(&c, "k", "v");
    assert!(
        refusal_lines(&c, "node1", "198.18.2.2") >= 1,
        "{}",
        c.node_log("node1")
    );
    c.lab.stop(pid, Duration::from_secs(5));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_node_key_claiming_another_name_is_refused() {
    let c = cluster("aun");
    assert_eq!(redis_cli(&c, "client2", &["SET", "k", "v"]), "OK");
    let before = refused(&c, "node1");
    // node2's key (stolen), node3's name.
    let auth = attacker(
        &c,
        "node3",
        secret(&c.key_file("node2").unwrap(), keys::NODE_KEY_LABEL),
        secret(
            &c.cluster_key_file("node2").unwrap(),
            keys::CLUSTER_KEY_LABEL,
        ),
    );
    let r = in_host(&c, "client1", move || ask(auth, move_to("node3")));
    assert!(r.is_err(), "answered {r:?}");
    assert_eq!(wait_refused(&c, "node1", before + 1), before + 1);
    assert_eq!(
        refusal_lines(&c, "node1", "claimed another node's name"),
        1,
        "{}",
        c.node_log("node1")
    );
    assert!(c
        .node_log("node1")
        .contains("authenticated as node2, claims to be node3"));
    still_serving(&c, "k", "v");
}

/// A transport that records everything written through it.
struct Recorder<S> {
    inner: S,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.sent.lock().unwrap().extend_from_slice(&buf[..*n]);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[test]
fn a_replayed_or_altered_exchange_is_refused() {
    let c = cluster("aur");
    assert_eq!(redis_cli(&c, "client2", &["SET", "k", "v"]), "OK");
    // A genuine exchange, recorded on the wire: node2's credentials ask
    // node1 to move kv to node3.
    let auth = attacker(
        &c,
        "node2",
        secret(&c.key_file("node2").unwrap(), keys::NODE_KEY_LABEL),
        secret(
            &c.cluster_key_file("node2").unwrap(),
            keys::CLUSTER_KEY_LABEL,
        ),
    );
    let key1 = public(&c, "node1");
    let recorded = in_host(&c, "client1", move || async move {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let tcp = tokio::net::TcpStream::connect(node_addr(1)).await.unwrap();
        let rec = Recorder {
            inner: tcp,
            sent: sent.clone(),
        };
        let mut s = auth.connect_over("node1", &key1, rec).await.unwrap();
        baton_node::control::write_peer(&mut s, &move_to("node3"))
            .await
            .unwrap();
        let reply = baton_node::control::read_peer::<PeerReply, _>(&mut s)
            .await
            .unwrap();
        assert!(matches!(reply, PeerReply::Moved(_)), "{reply:?}");
        drop(s);
        let bytes = sent.lock().unwrap().clone();
        bytes
    });
    assert_eq!(c.running_on("node1", "kv").as_deref(), Some("node3"));
    c.move_service("node1", "kv", "node1").unwrap();
    still_serving(&c, "k", "v");
    let before = refused(&c, "node1");

    // The same bytes again: refused, kv stays.
    let again = recorded.clone();
    let back = in_host(&c, "client1", move || send_raw(node_addr(1), again));
    assert!(
        back.len() < 1000,
        "answered a replay with {} bytes",
        back.len()
    );
    assert_eq!(wait_refused(&c, "node1", before + 1), before + 1);
    still_serving(&c, "k", "v");
    assert_eq!(
        refusal_lines(&c, "node1", "handshake not completed"),
        1,
        "{}",
        c.node_log("node1")
    );

    // One flipped byte anywhere (preamble, handshake, hello, request):
    // refused, nothing moves.
    let positions = [2, 4 + 2 + 10, 4 + 2 + 60, 4 + 98 + 5, recorded.len() - 5];
    for (i, at) in positions.into_iter().enumerate() {
        let mut altered = recorded.clone();
        altered[at] ^= 0x20;
        in_host(&c, "client1", move || send_raw(node_addr(1), altered));
        assert_eq!(
            wait_refused(&c, "node1", before + 2 + i as u64),
            before + 2 + i as u64,
            "flip at {at}"
        );
        still_serving(&c, "k", "v");
    }
}

fn write_config(dir: &Path, key_file: &Path, psk: &Path, public1: &str) -> PathBuf {
    let text = format!(
        "node = \"node1\"\ninterface = \"eth0\"\nstate_dir = \"{}\"\nkey_file = \"{}\"\ncluster_key_file = \"{}\"\n[peers]\nnode1 = \"198.18.1.1:7700\"\n[public_keys]\nnode1 = \"{public1}\"\n",
        dir.join("state").display(),
        key_file.display(),
        psk.display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_key_files_stop_the_node_with_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("baton-au-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let good_key = dir.join("good.key");
    let psk = dir.join("cluster.key");
    let key = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(BIN).arg("key").args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let public1 = key(&["node".as_ref(), good_key.as_os_str()]);
    key(&["cluster".as_ref(), psk.as_os_str()]);
    let other = dir.join("other.key");
    key(&["node".as_ref(), other.as_os_str()]);
    let open = dir.join("open.key");
    std::fs::copy(&good_key, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = dir.join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
    let unreadable = dir.join("unreadable.key");
    std::fs::create_dir(&unreadable).unwrap();

    let cases: [(&Path, &Path, &str, &str); 7] = [
        (&dir.join("missing.key"), &psk, "missing.key", "missing"),
        (&unreadable, &psk, "unreadable.key", "cannot read"),
        (&open, &psk, "open.key", "readable by group or others"),
        (&garbage, &psk, "garbage.key", "wrong format"),
        (
            &other,
            &psk,
            "other.key",
            "does not match public_keys.node1",
        ),
        (&good_key, &garbage, "garbage.key", "wrong format"),
        (&good_key, &good_key, "good.key", "wrong kind of key"),
    ];
    for (key_file, psk_file, names, problem) in cases {
        let config = write_config(&dir, key_file, psk_file, &public1);
        let out = Command::new("timeout")
            .arg("20")
            .arg(BIN)
            .args(["node", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{names}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{names}: {err}");
        assert!(
            err.contains(names) && err.contains(problem),
            "{names}: {err}"
        );
        assert!(!dir.join("state").exists(), "{names}: changed something");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn different_kernel_settings_are_a_warning_on_both_sides() {
    let lab = Lab::create(&Lab::unique_name("aum"), 3, 1).unwrap();
    let out = lab
        .command("node3", "sysctl")
        .unwrap()
        .args(["-qw", "net.ipv4.tcp_sack=0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let c = start(lab);
    let status = c.request("node1", &json!({"op": "status"})).unwrap();
    let warnings: Vec<String> = status["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_owned())
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("node3: net.ipv4.tcp_sack differs: 1 here, 0 on node3")),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|w| w.starts_with("node2")),
        "{warnings:?}"
    );
    let status3 = c.request("node3", &json!({"op": "status"})).unwrap();
    assert!(
        status3["warnings"].as_array().unwrap().iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("tcp_sack differs: 0 here, 1 on node1")),
        "{status3}"
    );
    assert!(c.node_log("node3").contains("kernel TCP settings differ"));
    // A warning, not a refusal: moves go on.
    c.move_service("node1", "kv", "node2").unwrap();
}
