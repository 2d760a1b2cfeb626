//! Answers to the control socket's inspection requests (`geneflowctl ports/flows/trace/stats/
//! ct`).

use super::*;

impl Forwarder {
    pub(super) fn ifname(&self, ix: u32) -> String {
        self.ports
            .iter()
            .find(|p| p.ifindex == ix)
            .map(|p| p.iface.clone())
            .unwrap_or_else(|| format!("ifindex {ix}"))
    }

    /// Answers an inspection request from the control socket.
    pub(super) fn answer(&mut self, cmd: &str, arg: &serde_json::Value) -> serde_json::Value {
        use serde_json::json;
        match cmd {
            "ct" => self.ct_list(),
            "ct-flush" => {
                let zone = arg["zone"].as_u64().map(|z| z as u32);
                let n = self.bpf.ct_delete(|k, _| zone.is_none_or(|z| z == k.zone));
                self.shared
                    .conntrack_flushed
                    .fetch_add(n as u64, Ordering::Relaxed);
                json!({ "flushed": n })
            }
            "ports" => {
                let ports: Vec<_> = self
                    .ports
                    .iter()
                    .map(|p| {
                        let b = self.pipeline.bindings.get(&p.iface);
                        let sw = b.and_then(|b| self.pipeline.datapaths.get(&b.tunnel_key));
                        json!({
                            "iface": p.iface, "ifindex": p.ifindex, "slot": p.slot,
                            "kind": if p.kind == port_kind::UPLINK { "uplink" } else { "vm" },
                            "logical_port": b.map(|b| b.port.clone()),
                            "port_key": b.map(|b| b.key),
                            "mac": b.map(|b| b.mac.to_string()),
                            "switch": sw.map(|d| d.name.clone()),
                            "tunnel_key": b.map(|b| b.tunnel_key),
                        })
                    })
                    .collect();
                json!({ "ports": ports })
            }
            "flows" => {
                let flows: Vec<_> = self
                    .bpf
                    .flows()
                    .into_iter()
                    .map(|f| {
                        let a = &f.action;
                        let action = crate::pipeline::describe_action(a, &|i| self.ifname(i), true);
                        json!({
                            "match": crate::pipeline::describe_match(&f.key, &f.mask),
                            "mask_id": f.key.mask_id,
                            "action": action,
                            "datapath": a.dp_key,
                            "generation": a.generation,
                            "stale": f.stale,
                            "hits": f.hits,
                            "age_s": f.age.as_secs_f64(),
                        })
                    })
                    .collect();
                json!({ "megaflows": flows, "masks": self.bpf.mask_count() })
            }
            "trace" => match crate::pipeline::frame_from_spec(arg) {
                Err(e) => json!({ "error": e }),
                Ok((in_port, frame)) => {
                    // The uplink, a provider network (by physnet or interface), or a VM port.
                    let ix = if in_port == "uplink" {
                        Some(self.uplink_ifindex)
                    } else if let Some(ix) = self.physnets.get(&in_port).copied().or_else(|| {
                        self.cfg
                            .providers
                            .iter()
                            .find(|(_, i)| *i == in_port)
                            .and_then(|(n, _)| self.physnets.get(n).copied())
                    }) {
                        Some(ix)
                    } else {
                        self.pipeline
                            .bindings
                            .values()
                            .find(|b| b.port == in_port || b.iface == in_port)
                            .and_then(|b| self.tables.ifindex(&b.iface))
                    };
                    let vlan = arg["vlan"]
                        .as_u64()
                        .filter(|v| (1..=4094).contains(v))
                        .map(|v| geneflow_abi::VLAN_PRESENT | v as u16)
                        .unwrap_or(0);
                    match ix {
                        None => {
                            json!({ "error": format!("{in_port:?} is not a port bound on this chassis") })
                        }
                        Some(ix) => {
                            let t = self.tables.trace(&frame, (ix, vlan), &|i| self.ifname(i));
                            json!({
                                "stages": t.stages,
                                "outputs": t.outputs.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>(),
                                "verdict": match &t.verdict { Ok(_) => "forward".to_string(), Err(r) => format!("drop: {r:?}") },
                            })
                        }
                    }
                }
            },
            other => json!({ "error": format!("unknown request {other:?}") }),
        }
    }
}
