//! One connection type for a Redis server and for a Redis Cluster.
//!
//! `TALLY_REDIS_URL` may name a single server (or a replication group's primary
//! endpoint) or any node of a Redis Cluster (ElastiCache's configuration
//! endpoint works as is). [`RedisConn::connect`] asks the node (`INFO cluster`)
//! and, when cluster mode is enabled, uses redis-rs's cluster client, which
//! follows the cluster's topology itself (`MOVED`/`ASK` redirections, a replica
//! promoted after a failover). TLS (`rediss://`) and AUTH come from the URL in
//! both modes.
//!
//! Every command tally sends touches one hash slot: a speed-view bucket's keys
//! and its view share the bucket's hash tag ([`crate::redis_store::bucket_tag`],
//! made by [`tag_of_slot`]). So the same commands work in both modes. A pipeline may
//! span slots: in cluster mode it is split by slot, the parts sent at once
//! (redis-rs multiplexes them over one connection per node) and the replies put
//! back in order, because redis-rs sends a cluster pipeline to a single node.
//! Commands over the whole keyspace (`SCAN`, `INFO`, `CONFIG GET`) go to each
//! primary in turn ([`RedisConn::on_each_primary`]).

use std::collections::HashMap;
use std::sync::OnceLock;

use futures::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// The number of hash slots of a Redis Cluster (Redis Cluster specification).
pub const SLOTS: u16 = 16384;

/// A connection to Redis: one server, or a Redis Cluster. Cheap to clone (both
/// kinds multiplex one connection per server and reconnect by themselves).
#[derive(Clone)]
pub enum RedisConn {
    /// One server (or a replication group's primary endpoint).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// A primary of the cluster, as `CLUSTER NODES` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// Host, as `CLUSTER NODES` gives it (for logs).
    pub host: String,
    /// Client port.
    pub port: u16,
    /// A slot it serves: commands for this primary are routed by it, so they
    /// reach it however the client names nodes (an IP address, or the
    /// hostnames ElastiCache's `CLUSTER SLOTS` gives with TLS).
    pub slot: u16,
}

impl RedisConn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// Run `cmd` once on every primary (once on the server when not a
    /// cluster), in order; the replies in the same order.
    pub async fn on_each_primary(&self, cmd: &Cmd) -> RedisResult<Vec<Value>> {
        match self {
            RedisConn::Single(c) => {
                let mut c = c.clone();
                Ok(vec![cmd.query_async(&mut c).await?])
            }
            RedisConn::Cluster(_) => {
                let mut out = Vec::new();
                for p in self.primaries().await? {
                    out.push(self.query_on(Some(&p), cmd).await?);
                }
                Ok(out)
            }
        }
    }

    /// Run `cmd` on `primary` (None: the single server).
    pub async fn query_on(&self, primary: Option<&Primary>, cmd: &Cmd) -> RedisResult<Value> {
        match (self, primary) {
            (RedisConn::Cluster(c), Some(p)) => {
                let slot = Slot::new(p.slot % SLOTS).expect("below SLOTS");
                let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_slot(slot, SlotAddr::Master),
                ));
                c.clone().route_command(cmd.clone(), to).await
            }
            _ => {
                let mut c = self.clone();
                cmd.query_async(&mut c).await
            }
        }
    }

    /// The servers holding keys: the cluster's primaries, or `[None]` for a
    /// single server (for [`RedisConn::query_on`]).
    pub async fn key_holders(&self) -> RedisResult<Vec<Option<Primary>>> {
        Ok(match self {
            RedisConn::Single(_) => vec![None],
            RedisConn::Cluster(_) => self.primaries().await?.into_iter().map(Some).collect(),
        })
    }

    /// The cluster's primaries that are not failing (`CLUSTER NODES`); empty
    /// for a single server.
    pub async fn primaries(&self) -> RedisResult<Vec<Primary>> {
        let RedisConn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let nodes = cluster_nodes(c).await?;
        Ok(parse_nodes(&nodes).into_iter().map(|(p, _)| p).collect())
    }

    /// The fewest replicas any primary has (`CLUSTER NODES` on a cluster,
    /// `INFO replication` on a single server): how many replicas a write can be
    /// made to reach with `WAIT`.
    pub async fn min_replicas(&self) -> RedisResult<usize> {
        match self {
            RedisConn::Single(c) => {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut c.clone())
                    .await?;
                Ok(info
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0))
            }
            RedisConn::Cluster(c) => {
                let nodes = cluster_nodes(c).await?;
                Ok(min_replicas(&nodes))
            }
        }
    }

    /// The slot ranges each live primary serves (`CLUSTER NODES`), one list
    /// per primary; one primary serving every slot for a single server.
    pub async fn primary_ranges(&self) -> RedisResult<Vec<Vec<(u16, u16)>>> {
        let RedisConn::Cluster(c) = self else {
            return Ok(vec![vec![(0, SLOTS - 1)]]);
        };
        let nodes = cluster_nodes(c).await?;
        Ok(parse_nodes(&nodes).into_iter().map(|(_, r)| r).collect())
    }
}

/// The cluster's `CLUSTER NODES` reply, from any node.
async fn cluster_nodes(c: &ClusterConnection) -> RedisResult<String> {
    let reply = c
        .clone()
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    Ok(redis::from_redis_value(reply)?)
}

/// The primaries of a `CLUSTER NODES` reply (lines of `id host:port@bus[,name]
/// flags master ping pong epoch link slots...`; Redis Cluster specification)
/// with their slot ranges, failing ones and those without slots left out.
fn parse_nodes(nodes: &str) -> Vec<(Primary, Vec<(u16, u16)>)> {
    let mut out = Vec::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.iter().any(|f| f.starts_with("fail")) {
            continue;
        }
        // with no slots a primary holds no keys
        if fields.len() <= 8 {
            continue;
        }
        // `a-b` or `a`; `[a->-id]` / `[a-<-id]` are slots being migrated
        let ranges: Vec<(u16, u16)> = fields[8..]
            .iter()
            .filter(|r| !r.starts_with('['))
            .filter_map(|r| match r.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => r.parse().ok().map(|a| (a, a)),
            })
            .collect();
        let Some(&(slot, _)) = ranges.first() else {
            continue;
        };
        let hostport = addr.split(['@', ',']).next().unwrap_or("");
        if let Some((host, port)) = hostport.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                let p = Primary {
                    host: host.to_string(),
                    port,
                    slot,
                };
                out.push((p, ranges));
            }
        }
    }
    out
}

/// The fewest live replicas of a primary holding slots, in a `CLUSTER NODES` reply.
fn min_replicas(nodes: &str) -> usize {
    let mut replicas: HashMap<&str, usize> = HashMap::new();
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(flags), Some(master)) = (f.first(), f.get(2), f.get(3)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        // a node only suspected (`fail?`) still counts: its writes may arrive
        if flags.contains(&"fail") {
            continue;
        }
        if flags.contains(&"master") && f.len() > 8 {
            replicas.entry(id).or_insert(0);
        } else if flags.contains(&"slave") {
            *replicas.entry(master).or_insert(0) += 1;
        }
    }
    // replicas of a node that is no primary with slots do not count
    let primaries: Vec<&str> = nodes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = f.get(2)?;
            (flags.split(',').any(|x| x == "master")
                && !flags.split(',').any(|x| x == "fail")
                && f.len() > 8)
                .then_some(f[0])
        })
        .collect();
    primaries
        .iter()
        .map(|p| replicas.get(p).copied().unwrap_or(0))
        .min()
        .unwrap_or(0)
}

/// The key a command of tally's is routed by: the first key of `EVAL`/`EVALSHA`
/// (after the script and the key count), none for commands without a key, else
/// the first argument. Covers the commands tally sends; a command routed wrong
/// would come back from the cluster as a `MOVED` error, never run on the
/// wrong node.
fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(b) => b,
        _ => &[][..],
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _script = args.next()?;
            let n: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
            if n == 0 {
                return None;
            }
            args.next().map(<[u8]>::to_vec)
        }
        b"PING" | b"INFO" | b"SCAN" | b"CONFIG" | b"SCRIPT" | b"CLUSTER" | b"TIME" | b"DBSIZE"
        | b"FLUSHALL" | b"FLUSHDB" | b"WAIT" | b"MEMORY" => None,
        _ => args.next().map(<[u8]>::to_vec),
    }
}

/// Send `pipeline`'s commands by slot: one sub-pipeline per slot (and keyless
/// commands alone), all at once; replies in the pipeline's order.
async fn cluster_pipeline(c: &ClusterConnection, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
    let mut groups: Vec<(Option<Slot>, Vec<usize>)> = Vec::new();
    let mut by_slot: HashMap<Slot, usize> = HashMap::new();
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    for (i, cmd) in cmds.iter().enumerate() {
        match routing_key(cmd).map(Slot::for_key) {
            Some(slot) => {
                let g = *by_slot.entry(slot).or_insert_with(|| {
                    groups.push((Some(slot), Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(i);
            }
            None => groups.push((None, vec![i])),
        }
    }
    let sends = groups.iter().map(|(slot, idx)| {
        let mut c = c.clone();
        let cmds = &cmds;
        async move {
            match slot {
                Some(slot) => {
                    let mut p = redis::pipe();
                    for &i in idx {
                        p.add_command((*cmds[i]).clone());
                    }
                    let route = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
                        *slot,
                        SlotAddr::Master,
                    ));
                    c.route_pipeline(p, 0, idx.len(), route).await
                }
                None => Ok(vec![c.req_packed_command(cmds[idx[0]]).await?]),
            }
        }
    });
    let replies = try_join_all(sends).await?;
    let mut out = vec![Value::Nil; cmds.len()];
    for ((_, idx), values) in groups.iter().zip(replies) {
        for (&i, v) in idx.iter().zip(values) {
            out[i] = v;
        }
    }
    Ok(out)
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => {
                if pipeline.is_transaction() {
                    // a transaction must be one slot anyway
                    return c.req_packed_commands(pipeline, offset, count);
                }
                let c = c.clone();
                Box::pin(async move {
                    let all = cluster_pipeline(&c, pipeline).await?;
                    Ok(all.into_iter().skip(offset).take(count).collect())
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// A hash tag per slot: `SLOT_TAGS[s]` is a short string whose keys are in
/// slot `s` (found once by trying `0`, `1`, `2`, ... in turn).
fn slot_tags() -> &'static HashMap<Slot, String> {
    static TAGS: OnceLock<HashMap<Slot, String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = HashMap::with_capacity(usize::from(SLOTS));
        let mut i = 0u64;
        while tags.len() < usize::from(SLOTS) {
            let tag = i.to_string();
            tags.entry(Slot::for_key(&tag)).or_insert(tag);
            i += 1;
        }
        tags
    })
}

/// The tag of slot `slot` (0 to 16383; others are taken modulo 16384).
pub fn tag_of_slot(slot: u16) -> &'static str {
    let slot = Slot::new(slot % SLOTS).expect("below SLOTS");
    slot_tags()
        .get(&slot)
        .map(String::as_str)
        .expect("every slot has a tag")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_a_tag_of_its_own_slot() {
        for slot in 0..SLOTS {
            let tag = tag_of_slot(slot);
            assert_eq!(
                Slot::for_key(format!("x{{{tag}}}y")),
                Slot::new(slot).unwrap()
            );
        }
    }

    #[test]
    fn commands_are_routed_by_their_key() {
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc").arg(2).arg("k1").arg("k2").arg("x");
        assert_eq!(routing_key(&c), Some(b"k1".to_vec()));
        assert_eq!(routing_key(redis::cmd("EVAL").arg("s").arg(0)), None);
        assert_eq!(
            routing_key(redis::cmd("HMGET").arg("h").arg("f")),
            Some(b"h".to_vec())
        );
        assert_eq!(routing_key(redis::cmd("SCAN").arg(0)), None);
    }

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
e7d1 127.0.0.1:30001@40001,node-a myself,master - 0 0 1 connected 0-5460
292f 127.0.0.1:30003@40003 master,fail - 0 1 3 connected 10923-16383
aaaa 127.0.0.1:30007@40007 master - 0 1 7 connected
";
        let p = parse_nodes(nodes);
        assert_eq!(
            p.iter().map(|(p, _)| p.port).collect::<Vec<_>>(),
            [30002, 30001],
            "{p:?}"
        );
        assert_eq!(p[1].0.host, "127.0.0.1");
        assert_eq!(p[0].1, [(5461, 10922)]);
        // e7d1 has a replica, 67ed none
        assert_eq!(min_replicas(nodes), 0);
        let with = format!("{nodes}0999 127.0.0.1:30005@40005 slave 67ed 0 1 5 connected\n");
        assert_eq!(min_replicas(&with), 1);
    }
}
