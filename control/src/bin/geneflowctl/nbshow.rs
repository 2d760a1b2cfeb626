//! `geneflowctl nb show`: the NB contents, as text or JSON.

use anyhow::Result;

pub(crate) fn show(d: &geneflow_control::model::NbDocument, format: &str) -> Result<()> {
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(d)?);
        return Ok(());
    }
    println!("NB version {}", d.version);
    for c in d.chassis.values() {
        println!("chassis {} encap geneve {}", c.name, c.encap_ip);
    }
    for s in d.switches.values() {
        println!(
            "switch {} (tunnel key {}, tenant {}, mtu {})",
            s.name, s.tunnel_key, s.tenant, s.mtu
        );
        for sn in d.subnets.values().filter(|x| x.switch == s.name) {
            println!(
                "    subnet {} {} gateway {} dhcp {}",
                sn.name,
                sn.cidr,
                sn.gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                if sn.dhcp { "on" } else { "off" }
            );
        }
        for p in d.ports.values().filter(|p| p.switch == s.name) {
            let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
            let bind = match (&p.chassis, &p.iface) {
                (Some(c), Some(i)) => format!("on {c} iface {i}"),
                (Some(c), None) => format!("on {c}"),
                _ => "unbound".to_string(),
            };
            let sgs = if p.security_groups.is_empty() {
                String::new()
            } else {
                format!(" sg [{}]", p.security_groups.join(" "))
            };
            println!(
                "    port {} key {} addresses [\"{} {}\"] {}{}",
                p.name,
                p.port_key,
                p.mac,
                ips.join(" "),
                bind,
                sgs
            );
        }
    }
    for r in d.routers.values() {
        println!(
            "router {} (tunnel key {}, tenant {})",
            r.name, r.tunnel_key, r.tenant
        );
        for p in d.router_ports.values().filter(|p| p.router == r.name) {
            println!(
                "    port {} {} {} key {} switch {}",
                p.name,
                p.mac,
                p.network,
                p.port_key,
                p.switch.as_deref().unwrap_or("-")
            );
        }
        for rt in d.routes.values().filter(|x| x.router == r.name) {
            println!("    route {} via {}", rt.prefix, rt.nexthop);
        }
        for f in d.floating_ips.values().filter(|x| x.router == r.name) {
            println!(
                "    floating IP {} {} -> port {}",
                f.name, f.external_ip, f.port
            );
        }
    }
    for g in d.security_groups.values() {
        println!("security group {} (tenant {})", g.name, g.tenant);
        for r in &g.rules {
            println!(
                "    rule {} {:?} {:?} proto {} ports {}-{} remote {}",
                r.id,
                r.direction,
                r.ethertype,
                r.protocol.as_deref().unwrap_or("any"),
                r.port_min
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "*".into()),
                r.port_max
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "*".into()),
                r.remote_prefix
                    .map(|p| p.to_string())
                    .or_else(|| r.remote_group.clone())
                    .unwrap_or_else(|| "any".into())
            );
        }
    }
    Ok(())
}
