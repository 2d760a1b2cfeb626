//! Routing: longest-prefix match over the router's connected subnets and static routes.

use super::super::Run;
use geneflow_control::compiler::{CompiledRoute, Router};

pub(in super::super) fn run<'a>(
    r: &mut Run,
    router: &'a Router,
    dst: std::net::Ipv4Addr,
) -> Option<&'a CompiledRoute> {
    let route = router.lookup(dst);
    r.note("routing", || match route {
        Some(rt) => format!(
            "{dst} matches {} via {} ({})",
            rt.prefix,
            router.ports[rt.port].name,
            rt.nexthop
                .map(|n| format!("next hop {n}"))
                .unwrap_or_else(|| "connected".into())
        ),
        None => format!("no route to {dst}: ICMP network unreachable"),
    });
    route
}
