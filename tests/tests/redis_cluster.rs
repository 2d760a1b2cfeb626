//! End-to-end: the NB on a Redis Cluster of six `redis-server` (three masters, a replica each)
//! started by the harness. Records spread over the masters; a master killed while traffic
//! flows and the NB changes: its replica takes over, the writer's commands follow the new
//! topology, every change reaches the agents (those subscribed on the dead node resync from
//! another), and the established stream loses nothing.

use anyhow::{Context, Result};
use geneflow_tests::*;
use std::time::Duration;

#[test]
fn records_spread_over_the_masters() -> Result<()> {
    let tb = two_chassis_on("cs", NbKind::RedisCluster)?;
    tb.ping("vm1", &tb.vm("vm3")?.ip.clone(), 1)?;
    let mut masters = std::collections::BTreeSet::new();
    for k in [
        "/gf/t/default/ports/vm1",
        "/gf/t/default/ports/vm2",
        "/gf/t/default/ports/vm3",
        "/gf/t/default/ports/vm4",
        "/gf/t/default/switches/ls1",
        "/gf/global/chassis/ch1",
        "/gf/global/chassis/ch2",
        "/gf/bind/ch1/vm1",
        "/gf/bind/ch2/vm3",
    ] {
        let m = tb.redis_master_of(k)?;
        let node = format!("{DB_IP}:{}", tb.servers[m].client_port);
        // Asked directly (no cluster redirection), the master of the key's slot has it.
        let v = tb.redis_cli(&node, &["EXISTS", k])?;
        assert_eq!(v.trim(), "1", "{k} not on its master {node}");
        masters.insert(m);
    }
    assert!(masters.len() >= 2, "all records on one master: {masters:?}");
    Ok(())
}

#[test]
fn a_master_killed_mid_stream_loses_no_update() -> Result<()> {
    let mut tb = two_chassis_on("ck", NbKind::RedisCluster)?;
    let (ip3, ip4) = (tb.vm("vm3")?.ip.clone(), tb.vm("vm4")?.ip.clone());
    tb.ping("vm1", &ip3, 1)?;
    tb.ping("vm2", &ip4, 1)?;
    let rx = tb.udp_receiver("vm3", 6500, 30_000, 4.0)?;
    let mut tx = tb.udp_sender("vm1", &ip3, 6500, 30_000, 5_000)?;
    std::thread::sleep(Duration::from_millis(500));
    // Kill the master that holds vm4's port: the next change writes there.
    let m = tb.redis_master_of("/gf/t/default/ports/vm4")?;
    let killed = tb.servers[m].client_port;
    tb.kill_server(m);
    // Changes made at once: the writer retries until the replica has taken over.
    tb.nbctl(&["lsp-del", "vm4"])
        .context("write during the failover")?;
    within(Duration::from_secs(10), || Ok(!reachable(&tb, "vm2", &ip4)))?
        .context("the deletion written during the failover never reached ch1")?;
    // A port added after the failover (vm5 on ch2) carries traffic too.
    tb.add_vm_unbound("vm5", "ch2", 5)?;
    let ip5 = tb.vm("vm5")?.ip.clone();
    add_port_of_vm5(&tb)?;
    within(Duration::from_secs(10), || Ok(reachable(&tb, "vm1", &ip5)))?
        .context("a port added after the failover never carried traffic")?;
    // A replica took the dead master's slots.
    assert_ne!(
        tb.servers[tb.redis_master_of("/gf/t/default/ports/vm4")?].client_port,
        killed
    );
    // Now the master on 7000, a seed agents subscribe on: whoever listened there resyncs
    // from another node, and a change made meanwhile still arrives.
    let first = tb
        .servers
        .iter()
        .position(|s| s.client_port == 7000)
        .context("no 7000")?;
    tb.kill_server(first);
    tb.nbctl(&["lsp-del", "vm5"])
        .context("write during the second failover")?;
    within(Duration::from_secs(10), || Ok(!reachable(&tb, "vm1", &ip5)))?
        .context("the deletion written during the second failover never arrived")?;
    // The stream crossed both failovers whole.
    assert!(tx.wait()?.success(), "sender failed");
    let got = Testbed::udp_result(rx)?;
    assert_eq!(got, 30_000, "the stream lost {} datagrams", 30_000 - got);
    // ch1's subscription cut on whichever node holds it: ch1 resyncs from a node and hears
    // the next change.
    let resyncs =
        |c: &str| -> Result<u64> { Ok(tb.stats(c)?["nb"]["resyncs"].as_u64().unwrap_or(0)) };
    let r0 = resyncs("ch1")?;
    let ch1_ip = tb.chassis[0].ip.clone();
    let mut cut = false;
    for s in &tb.servers {
        let node = format!("{DB_IP}:{}", s.client_port);
        let Ok(list) = tb.redis_cli(&node, &["CLIENT", "LIST", "TYPE", "pubsub"]) else {
            continue; // a killed node
        };
        for l in list
            .lines()
            .filter(|l| l.contains(&format!("addr={ch1_ip}:")))
        {
            if let Some(id) = l.split_whitespace().find_map(|f| f.strip_prefix("id=")) {
                tb.redis_cli(&node, &["CLIENT", "KILL", "ID", id])?;
                cut = true;
            }
        }
    }
    assert!(cut, "ch1 has no subscription on any node");
    within(Duration::from_secs(5), || Ok(resyncs("ch1")? > r0))?
        .context("ch1 did not resync after losing its subscription")?;
    tb.nbctl(&["lsp-del", "vm3"])?;
    within(Duration::from_secs(5), || Ok(!reachable(&tb, "vm1", &ip3)))?
        .context("a change after the resubscription never arrived")?;
    for c in ["ch1", "ch2"] {
        assert_eq!(tb.stats(c)?["nb"]["connected"], true, "{c}");
    }
    Ok(())
}
