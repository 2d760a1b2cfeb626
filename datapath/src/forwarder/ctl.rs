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
            "ct" => crate::ctl::ct_json(self.bpf.ct_entries(), forward::monotonic_ns()),
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
                        let kind = if p.kind == port_kind::UPLINK {
                            "uplink"
                        } else {
                            "vm"
                        };
                        crate::ctl::port_json(&self.pipeline, &p.iface, (p.ifindex, p.slot), kind)
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
                        crate::pipeline::flow_json(
                            (&f.key, &f.mask, &f.action),
                            (f.stale, f.hits, Some(f.age.as_secs_f64())),
                            &|i| self.ifname(i),
                        )
                    })
                    .collect();
                json!({ "megaflows": flows, "masks": self.bpf.mask_count() })
            }
            "trace" => {
                // The uplink, a provider network (by physnet or interface), or a VM port.
                let resolve = |in_port: &str| {
                    self.physnets.get(in_port).copied().or_else(|| {
                        self.cfg
                            .providers
                            .iter()
                            .find(|(_, i)| *i == in_port)
                            .and_then(|(n, _)| self.physnets.get(n).copied())
                    })
                };
                crate::pipeline::trace_answer(&self.tables, arg, &resolve, &|i| self.ifname(i))
            }
            other => json!({ "error": format!("unknown request {other:?}") }),
        }
    }
}
