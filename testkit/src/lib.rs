//! Test support shared by every crate's tests: real services on free loopback
//! ports (redis-server, and moto's server for S3 and Kinesis), started by the
//! test and stopped when dropped.
//!
//! A test that needs a service and cannot start it panics with what to install;
//! it is never skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "run scripts/install-services.sh (apt-get install redis-server; a Python venv with moto[server])";

/// A free TCP port on 127.0.0.1 (bound and released; services started on it retry on a clash).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn find_binary(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    for p in extra {
        if p.is_file() {
            return Some(p.clone());
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn venv_dir() -> PathBuf {
    if let Some(v) = std::env::var_os("TALLY_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/tally/venv")
}

/// The Python of the project's test venv (with moto, deltalake, duckdb), if it exists.
pub fn venv_python() -> PathBuf {
    let p = venv_dir().join("bin/python");
    assert!(
        p.is_file(),
        "no test venv at {}: {INSTALL_HINT}",
        p.display()
    );
    p
}

fn wait_until(deadline: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn redis_pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    // a server with a password answers NOAUTH: it is up all the same
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
}

fn http_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"HTTP/1."))
}

/// A `redis-server` of the test's own, on a free loopback port, without persistence.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
    /// With persistence: the directory of its append-only file (kept across restarts).
    data_dir: Option<tempfile::TempDir>,
    /// The AUTH password it requires, if any.
    password: Option<String>,
}

impl RedisServer {
    /// Start one; panics with an install hint when `redis-server` is missing or will not start.
    pub fn start() -> Self {
        let binary = find_binary("redis-server", &[PathBuf::from("/usr/bin/redis-server")])
            .unwrap_or_else(|| panic!("redis-server not found: {INSTALL_HINT}"));
        for _ in 0..5 {
            let mut s = RedisServer {
                binary: binary.clone(),
                port: free_port(),
                child: None,
                data_dir: None,
                password: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server would not start on a loopback port: {INSTALL_HINT}");
    }

    /// Start one that keeps its data across [`RedisServer::restart`] (an
    /// append-only file synced on every write, as a replica that takes over would
    /// have it).
    pub fn start_persistent() -> Self {
        let mut s = RedisServer::start();
        s.stop();
        s.data_dir = Some(tempfile::tempdir().expect("a directory for redis data"));
        assert!(
            s.spawn(),
            "redis-server would not start with persistence: {INSTALL_HINT}"
        );
        s
    }

    /// Start one that requires `password` (`AUTH`), as ElastiCache with an AUTH token does.
    pub fn start_with_password(password: &str) -> Self {
        let mut s = RedisServer::start();
        s.stop();
        s.password = Some(password.to_string());
        assert!(
            s.spawn(),
            "redis-server would not start with a password: {INSTALL_HINT}"
        );
        s
    }

    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ]);
        match &self.data_dir {
            Some(d) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(d.path()),
            None => cmd.args(["--appendonly", "no"]),
        };
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let port = self.port;
        if wait_until(Duration::from_secs(10), || redis_pings(port)) {
            true
        } else {
            self.stop();
            false
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kill the server (its data is gone unless started with persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port with no data at all, persistence or not
    /// (a restart that lost its files, a failover to an empty replica).
    pub fn restart_empty(&mut self) {
        self.stop();
        if self.data_dir.is_some() {
            self.data_dir = Some(tempfile::tempdir().expect("a directory for redis data"));
        }
        assert!(
            self.spawn(),
            "redis-server would not restart on port {}",
            self.port
        );
    }

    /// Start it again on the same port (empty, unless started with persistence).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server would not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Redis Cluster on loopback: `primaries` primaries with a replica each
/// (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster
/// create`), each node's bus on its port + 10000, as ElastiCache's cluster
/// mode has it; every node keeps an append-only file synced on every write,
/// so a node killed and restarted has exactly what it had. Stopped when dropped.
pub struct RedisCluster {
    binary: PathBuf,
    cli: PathBuf,
    dir: tempfile::TempDir,
    /// Node ports; `None` once the node was killed.
    nodes: Vec<(u16, Option<Child>)>,
    node_timeout_ms: u64,
    primaries: usize,
    persistent: bool,
}

/// A free port whose bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if p < 55000 && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair (port, port + 10000) for a cluster node")
}

impl RedisCluster {
    /// Start `primaries` primaries and as many replicas and join them into a
    /// cluster; panics with an install hint when `redis-server`/`redis-cli`
    /// are missing or the cluster does not form within 60 s.
    pub fn start(primaries: usize) -> Self {
        Self::start_with_node_timeout(primaries, Duration::from_secs(2))
    }

    /// [`RedisCluster::start`] with `cluster-node-timeout` `timeout`: how long a
    /// node may be unreachable before it is suspected and its replica promoted.
    pub fn start_with_node_timeout(primaries: usize, timeout: Duration) -> Self {
        Self::start_with(primaries, timeout, true)
    }

    /// [`RedisCluster::start_with_node_timeout`], with (`persistent`) or without
    /// append-only files (as ElastiCache runs by default: a node restarted
    /// without them comes back empty).
    pub fn start_with(primaries: usize, timeout: Duration, persistent: bool) -> Self {
        let binary = find_binary("redis-server", &[PathBuf::from("/usr/bin/redis-server")])
            .unwrap_or_else(|| panic!("redis-server not found: {INSTALL_HINT}"));
        let cli = find_binary("redis-cli", &[PathBuf::from("/usr/bin/redis-cli")])
            .unwrap_or_else(|| panic!("redis-cli not found: {INSTALL_HINT}"));
        let mut c = RedisCluster {
            binary,
            cli,
            dir: tempfile::tempdir().expect("a directory for the cluster's node files"),
            nodes: Vec::new(),
            node_timeout_ms: timeout.as_millis() as u64,
            primaries,
            persistent,
        };
        for _ in 0..2 * primaries {
            let port = free_cluster_port();
            c.nodes.push((port, None));
            let i = c.nodes.len() - 1;
            c.spawn(i);
        }
        let mut create = Command::new(&c.cli);
        create.arg("--cluster").arg("create");
        for (p, _) in &c.nodes {
            create.arg(format!("127.0.0.1:{p}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok(Duration::from_secs(60));
        // and until every primary sees its replica attached
        // as every node sees it: a client may ask any of them
        let attached = wait_until(Duration::from_secs(60), || {
            c.live_ports().into_iter().all(|p| {
                let t = c.topology_seen_by(p);
                t.len() == primaries && t.iter().all(|(_, r)| !r.is_empty())
            })
        });
        assert!(
            attached,
            "the cluster's replicas did not attach: {:?}",
            c.topology()
        );
        c.wait_replicas_in_sync();
        c
    }

    /// Wait until every live replica's link to its primary is up (its first
    /// synchronisation done), so that `WAIT` can be answered.
    pub fn wait_replicas_in_sync(&self) {
        let replicas: Vec<u16> = self.topology().into_iter().flat_map(|(_, r)| r).collect();
        let synced = wait_until(Duration::from_secs(60), || {
            replicas.iter().all(|&r| {
                self.cli(r, &["INFO", "replication"])
                    .lines()
                    .any(|l| l.trim() == "master_link_status:up")
            })
        });
        assert!(
            synced,
            "the cluster's replicas did not synchronise with their primaries"
        );
    }

    fn spawn(&mut self, i: usize) {
        let port = self.nodes[i].0;
        // each node its own directory: its append-only file survives a restart
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).expect("a node directory");
        let child = Command::new(&self.binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout"])
            .arg(self.node_timeout_ms.to_string())
            .arg("--cluster-config-file")
            .arg(dir.join("nodes.conf"))
            .arg("--dir")
            .arg(&dir)
            .args(["--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .args([
                "--protected-mode",
                "yes",
                "--maxmemory-policy",
                "noeviction",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server would not start: {e}: {INSTALL_HINT}"));
        self.nodes[i].1 = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || redis_pings(port)),
            "cluster node on port {port} did not answer: {INSTALL_HINT}"
        );
    }

    /// `redis-cli -p port args...`'s output.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new(&self.cli)
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .expect("running redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until every live node says `cluster_state:ok` and sees the same
    /// number of primaries with slots.
    pub fn wait_ok(&self, within: Duration) {
        let ok = wait_until(within, || {
            self.live_ports().iter().all(|&p| {
                self.cli(p, &["CLUSTER", "INFO"])
                    .lines()
                    .any(|l| l.trim() == "cluster_state:ok")
            })
        });
        assert!(ok, "the Redis Cluster did not reach cluster_state:ok");
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// `redis://127.0.0.1:PORT/` of the first live node: any node is a way in.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.live_ports()[0])
    }

    /// Ports of the live primaries and, for each, its replicas' ports.
    pub fn topology(&self) -> Vec<(u16, Vec<u16>)> {
        self.topology_seen_by(self.live_ports()[0])
    }

    /// [`RedisCluster::topology`] as the node on `port` sees it (gossip
    /// reaches the nodes one after another).
    pub fn topology_seen_by(&self, port: u16) -> Vec<(u16, Vec<u16>)> {
        let nodes = self.cli(port, &["CLUSTER", "NODES"]);
        let port_of = |addr: &str| -> Option<u16> {
            addr.split(['@', ','])
                .next()?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        };
        let mut primaries: Vec<(String, u16, Vec<u16>)> = Vec::new();
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        for f in &lines {
            if f.len() > 8 && f[2].contains("master") && !f[2].contains("fail") {
                if let Some(p) = port_of(f[1]) {
                    primaries.push((f[0].to_string(), p, Vec::new()));
                }
            }
        }
        for f in &lines {
            if f.len() > 3 && f[2].contains("slave") && !f[2].contains("fail") {
                if let (Some(p), Some(e)) =
                    (port_of(f[1]), primaries.iter_mut().find(|e| e.0 == f[3]))
                {
                    e.2.push(p);
                }
            }
        }
        primaries.into_iter().map(|(_, p, r)| (p, r)).collect()
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self
            .cli(self.live_ports()[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        let nodes = self.cli(self.live_ports()[0], &["CLUSTER", "NODES"]);
        for l in nodes.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() <= 8 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for r in &f[8..] {
                let (a, b) = match r.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => (r.parse().unwrap_or(u16::MAX), r.parse().unwrap_or(0)),
                };
                if (a..=b).contains(&slot) {
                    return f[1]
                        .split(['@', ','])
                        .next()
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|(_, p)| p.parse().ok())
                        .expect("a node address");
                }
            }
        }
        panic!("no primary serves slot {slot}")
    }

    fn index(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|(p, _)| *p == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Kill the node on `port` (SIGKILL: its unreplicated writes are gone).
    pub fn kill(&mut self, port: u16) {
        let i = self.index(port);
        if let Some(mut c) = self.nodes[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop the node on `port` cleanly (`SHUTDOWN`: its append-only file is
    /// written out first), as a replica taken down for maintenance.
    pub fn shutdown(&mut self, port: u16) {
        let i = self.index(port);
        let _ = self.cli(port, &["SHUTDOWN"]);
        if let Some(mut c) = self.nodes[i].1.take() {
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Wait until the killed primary on `port` is replaced: no live primary
    /// is on that port and the cluster serves every slot again (its replica
    /// was promoted by the cluster's own failover, after the node timeout).
    pub fn wait_failover(&self, port: u16, within: Duration) {
        let replaced = wait_until(within, || {
            let t = self.topology();
            t.len() == self.primaries && t.iter().all(|(p, _)| *p != port)
        });
        assert!(
            replaced,
            "the primary on {port} was not failed over: {:?}",
            self.topology()
        );
        self.wait_ok(within);
    }

    /// Start the killed node on `port` again, from its append-only file (with
    /// what it had when killed) and its cluster configuration.
    pub fn restart(&mut self, port: u16) {
        let i = self.index(port);
        self.spawn(i);
    }

    /// Make the replica on `port` its shard's primary without its primary's
    /// agreement (`CLUSTER FAILOVER TAKEOVER`), as after a primary's loss.
    pub fn takeover(&self, port: u16) {
        let out = self.cli(port, &["CLUSTER", "FAILOVER", "TAKEOVER"]);
        assert!(
            out.contains("OK"),
            "CLUSTER FAILOVER TAKEOVER on {port}: {out}"
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.nodes {
            if let Some(mut c) = c.take() {
                // SIGKILL ends a frozen (SIGSTOPped) node too
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// moto's server, an emulator that speaks the real S3 and Kinesis HTTP APIs,
/// with its Kinesis made to behave like AWS where plain moto does not
/// (`testkit/tools/kinesis_like_aws.py`): 56-digit, stream-wide increasing
/// sequence numbers (plain moto numbers records 1, 2, 3, which hides every bug
/// that assumes a sequence number fits a machine integer), AWS's reshard
/// behaviour and, with `EMU_ITER_TTL`, iterator expiry. Every test that uses
/// Kinesis sees production's shapes.
pub struct MotoServer {
    port: u16,
    child: Option<Child>,
}

impl MotoServer {
    /// Start one; panics with an install hint when moto is missing or will not start.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start one with extra environment for the emulator (e.g. `EMU_ITER_TTL`).
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        let python = venv_python();
        let script = workspace_root().join("testkit/tools/kinesis_like_aws.py");
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(&python)
                .arg(&script)
                .arg(port.to_string())
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let Ok(child) = child else { continue };
            let mut s = MotoServer {
                port,
                child: Some(child),
            };
            if wait_until(Duration::from_secs(30), || http_answers(port)) {
                return s;
            }
            s.stop();
        }
        panic!("moto's server (testkit/tools/kinesis_like_aws.py) would not start on a loopback port: {INSTALL_HINT}");
    }

    /// The endpoint URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kill the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Create an S3 bucket (a plain path-style PUT; the emulator needs no signature).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("moto is not answering");
        let req = format!(
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).expect("writing to moto");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(
            out.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {out}"
        );
    }

    /// Environment for the AWS SDKs and delta-rs to reach this emulator.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds (user + system) this process has used: benchmarks report it beside wall time.
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// CPU seconds (user + system) of this process's waited-for children so far.
pub fn cpu_secs_children() -> f64 {
    // SAFETY: getrusage only writes into the struct it is given
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// The directory of the crate under test: `CARGO_MANIFEST_DIR` as cargo sets it
/// when it runs a test or benchmark, not as it was when the test was compiled
/// (a target directory shared between checkouts, as CI's cache is, may hold a
/// test built from another path).
pub fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The workspace root (for finding scripts and the built binary): the nearest
/// directory at or above [`crate_dir`] whose `Cargo.toml` declares `[workspace]`.
pub fn workspace_root() -> PathBuf {
    let start = crate_dir();
    start
        .ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
        })
        .map_or(start.clone(), Path::to_path_buf)
}

/// Zipf-skewed NDJSON records for the benchmarks (drawn with the generator's
/// random source; expected answers always come from the records themselves).
pub mod zipf;

/// Seeded random events ([`events::generate`]) as NDJSON lines, and the
/// tests' independent model of their metrics ([`events::expected`]), written
/// without the registry or the SQL it checks.
pub mod events {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// One generated event, as the test's independent model sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct TestEvent {
        /// Event id.
        pub event_id: String,
        /// Merchant.
        pub merchant_id: String,
        /// `order`, `refund`, `page_view` or `other`.
        pub kind: &'static str,
        /// Event time, epoch milliseconds.
        pub ts_ms: i64,
        /// Amount for orders and refunds.
        pub amount: Option<i64>,
        /// Customer, when known.
        pub customer_id: Option<String>,
    }

    impl TestEvent {
        /// The event as one NDJSON line (without newline), `ts` in either wire form.
        pub fn to_line(&self, rfc3339: bool) -> String {
            let mut s = format!(
                r#"{{"event_id":"{}","merchant_id":"{}","type":"{}","#,
                self.event_id, self.merchant_id, self.kind
            );
            if rfc3339 {
                let secs = self.ts_ms.div_euclid(1000);
                let ms = self.ts_ms.rem_euclid(1000);
                let days = secs.div_euclid(86_400);
                let sod = secs.rem_euclid(86_400);
                let (y, m, d) = civil_from_days(days);
                s.push_str(&format!(
                    r#""ts":"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z""#,
                    sod / 3600,
                    (sod / 60) % 60,
                    sod % 60
                ));
            } else {
                s.push_str(&format!(r#""ts":{}"#, self.ts_ms));
            }
            if let Some(a) = self.amount {
                s.push_str(&format!(r#","amount":{a}"#));
            }
            if let Some(c) = &self.customer_id {
                s.push_str(&format!(r#","customer_id":"{c}""#));
            }
            s.push_str(r#","extra":{"note":"kept"}}"#);
            s
        }
    }

    // Howard Hinnant's days-to-civil, so the test model needs no date library.
    fn civil_from_days(z: i64) -> (i64, u32, u32) {
        let z = z + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let y = yoe + era * 400;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        (if m <= 2 { y + 1 } else { y }, m, d)
    }

    /// `n` events over `merchants` merchants and the hours starting at `start_ms`
    /// (epoch ms, hour aligned) for `hours` hours.
    pub fn generate(
        seed: u64,
        n: usize,
        merchants: usize,
        start_ms: i64,
        hours: i64,
    ) -> Vec<TestEvent> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let m = rng.random_range(0..merchants);
                let kind = match rng.random_range(0..100) {
                    0..=29 => "order",
                    30..=34 => "refund",
                    35..=97 => "page_view",
                    _ => "other",
                };
                let amount =
                    matches!(kind, "order" | "refund").then(|| rng.random_range(100..50_000));
                let customer_id = rng
                    .random_bool(0.8)
                    .then(|| format!("c{}", rng.random_range(0..50)));
                TestEvent {
                    event_id: format!("e{seed}-{i}"),
                    merchant_id: format!("m{m}"),
                    kind,
                    ts_ms: start_ms + rng.random_range(0..hours * 3_600_000),
                    amount,
                    customer_id,
                }
            })
            .collect()
    }

    /// The independent model of the metrics: per (merchant, hour start ms):
    /// [orders, gross_sales, refunds, refunded_amount, page_views] and the customer set.
    pub type Expected =
        std::collections::BTreeMap<(String, i64), ([i64; 5], std::collections::BTreeSet<String>)>;

    /// Compute [`Expected`] by hand over `events` (each counted once per call).
    pub fn expected(events: &[TestEvent]) -> Expected {
        let mut out = Expected::new();
        for e in events {
            let hour = e.ts_ms.div_euclid(3_600_000) * 3_600_000;
            let entry = out.entry((e.merchant_id.clone(), hour)).or_default();
            match e.kind {
                "order" => {
                    entry.0[0] += 1;
                    entry.0[1] += e.amount.unwrap_or(0);
                }
                "refund" => {
                    entry.0[2] += 1;
                    entry.0[3] += e.amount.unwrap_or(0);
                }
                "page_view" => entry.0[4] += 1,
                _ => {}
            }
            if let Some(c) = &e.customer_id {
                entry.1.insert(c.clone());
            }
        }
        out
    }
}

/// A TCP proxy on a loopback port in front of another, which a test can take
/// down (open connections cut, new ones closed at once) and bring back: an
/// endpoint that is unreachable for a while. It counts the requests it forwards
/// (a burst of bytes from the client after the server's last answer) and can
/// hold each answer's first bytes back for a fixed time: a distant endpoint,
/// such as S3 seen from a Lambda function.
pub struct Proxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Open connections (the client side), by id, so going down can cut them.
    open: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, std::net::TcpStream>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    /// Forward a free loopback port to `127.0.0.1:target`.
    pub fn start(target: u16) -> Self {
        Self::start_with_delay(target, Duration::ZERO)
    }

    /// Forward a free loopback port to `127.0.0.1:target`, holding the first
    /// bytes of every answer back for `delay`.
    pub fn start_with_delay(target: u16, delay: Duration) -> Self {
        use std::io::{Read as _, Write as _};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let down = Arc::new(AtomicBool::new(false));
        let open = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (d, o, r) = (down.clone(), open.clone(), requests.clone());
        std::thread::spawn(move || {
            for (id, client) in listener.incoming().enumerate() {
                let id = id as u64;
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (Ok(c2), Ok(s2), Ok(keep)) =
                    (client.try_clone(), server.try_clone(), client.try_clone())
                else {
                    continue;
                };
                if let Ok(mut m) = o.lock() {
                    m.insert(id, keep);
                }
                // true from a request's first bytes until its answer's first bytes
                let asked = Arc::new(AtomicBool::new(false));
                // one thread per direction; when the client side ends, both sockets
                // are shut down and the connection is forgotten
                let (a, r) = (asked.clone(), r.clone());
                std::thread::spawn(move || {
                    let (mut from, mut to) = (c2, s2);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if !a.swap(true, Ordering::SeqCst) {
                            r.fetch_add(1, Ordering::SeqCst);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
                let o = o.clone();
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if asked.swap(false, Ordering::SeqCst) && !delay.is_zero() {
                            std::thread::sleep(delay);
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    if let Ok(mut m) = o.lock() {
                        m.remove(&id);
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            open,
            requests,
        }
    }

    /// Requests forwarded so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cut every open connection and refuse new ones (`true`), or forward again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        if down {
            if let Ok(mut m) = self.open.lock() {
                for (_, s) in m.drain() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

/// Kinesis in tests: a client for moto's server, and a stream's records as the
/// Lambda service delivers them.
pub mod kinesis {
    use aws_lambda_events::event::kinesis::KinesisEvent;
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    use aws_sdk_kinesis::types::ShardIteratorType;
    use aws_sdk_kinesis::Client;
    use base64::Engine as _;

    /// A Kinesis client for the emulator at `endpoint`.
    pub fn client(endpoint: &str) -> Client {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .build();
        Client::from_conf(config)
    }

    /// Create `stream` with `shards` shards.
    pub async fn create_stream(client: &Client, stream: &str, shards: i32) {
        client
            .create_stream()
            .stream_name(stream)
            .shard_count(shards)
            .send()
            .await
            .expect("creating the stream");
    }

    /// Every record of `stream`, as the Lambda service would deliver them (one event per shard).
    pub async fn lambda_events(client: &Client, stream: &str) -> Vec<KinesisEvent> {
        let shards = client
            .list_shards()
            .stream_name(stream)
            .send()
            .await
            .expect("listing shards")
            .shards
            .unwrap_or_default();
        let mut out = Vec::new();
        for s in shards {
            let mut it = client
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(&s.shard_id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("a shard iterator")
                .shard_iterator;
            let mut records = Vec::new();
            while let Some(i) = it {
                let r = client
                    .get_records()
                    .shard_iterator(i)
                    .send()
                    .await
                    .expect("GetRecords");
                if r.records.is_empty() {
                    break;
                }
                records.extend(r.records);
                it = r.next_shard_iterator;
            }
            let json: Vec<serde_json::Value> = records
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "eventSource": "aws:kinesis",
                        "eventID": format!("{}:{}", s.shard_id, r.sequence_number),
                        "eventSourceARN": format!("arn:aws:kinesis:us-east-1:123456789012:stream/{stream}"),
                        "eventName": "aws:kinesis:record",
                        "eventVersion": "1.0",
                        "awsRegion": "us-east-1",
                        "kinesis": {
                            "kinesisSchemaVersion": "1.0",
                            "partitionKey": r.partition_key,
                            "sequenceNumber": r.sequence_number,
                            "data": base64::engine::general_purpose::STANDARD.encode(r.data.as_ref()),
                            "approximateArrivalTimestamp": 1.7e9
                        }
                    })
                })
                .collect();
            out.push(
                serde_json::from_value(serde_json::json!({ "Records": json }))
                    .expect("a Lambda Kinesis event"),
            );
        }
        out
    }
}

/// `GET path` on `addr` with a bearer token over a fresh connection: the status
/// and the body (the JSON object of a chunked body).
pub fn http_get(addr: &str, path: &str, token: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_string(),
        _ => body,
    };
    Ok((status, body))
}

/// Check one API bucket's JSON against the counters (orders, gross_sales,
/// refunds, refunded_amount, page_views), the derived metrics computed from them,
/// and the true number of distinct customers: equal where the API says its
/// count is exact (`unique_customers_bounds` null), within the bounds it gives
/// where it estimates.
pub fn check_bucket(b: &serde_json::Value, counters: [i64; 5], unique: usize) {
    let names = [
        "orders",
        "gross_sales",
        "refunds",
        "refunded_amount",
        "page_views",
    ];
    for (i, n) in names.iter().enumerate() {
        assert_eq!(b[n], counters[i], "{n} of {b}");
    }
    let n = unique as i64;
    match b["unique_customers_bounds"].as_array() {
        None => assert_eq!(b["unique_customers"], n, "{b}"),
        Some(bounds) => {
            let (lo, hi) = (bounds[0].as_i64().unwrap(), bounds[1].as_i64().unwrap());
            let got = b["unique_customers"].as_i64().unwrap();
            assert!(
                lo <= n && n <= hi && lo <= got && got <= hi,
                "{n} customers: {b}"
            );
        }
    }
    assert_eq!(b["net_sales"], counters[1] - counters[3], "{b}");
    if counters[0] == 0 {
        assert!(b["avg_order_value"].is_null(), "{b}");
    } else {
        let want = counters[1] as f64 / counters[0] as f64;
        assert!(
            (b["avg_order_value"].as_f64().unwrap() - want).abs() < 1e-9,
            "{b}"
        );
    }
    if counters[4] == 0 {
        assert!(b["conversion_rate"].is_null(), "{b}");
    } else {
        let want = counters[0] as f64 / counters[4] as f64;
        assert!(
            (b["conversion_rate"].as_f64().unwrap() - want).abs() < 1e-9,
            "{b}"
        );
    }
}
