//! The arguments of `geneflowctl nb ...`, one subcommand per NB edit, as ovn-nbctl names
//! them (`ls-add`, `lsp-add`, `lr-route-add`, `sg-rule-add`, ...).

use clap::Subcommand;
use geneflow_control::model::DEFAULT_TENANT;
use std::net::Ipv4Addr;

#[derive(Subcommand)]
pub(crate) enum NbCmd {
    /// Add a chassis and its Geneve encap IPv4 address.
    ChassisAdd {
        name: String,
        encap_ip: Ipv4Addr,
        /// Address on the provider networks for default SNAT of VMs without a floating IP.
        #[arg(long)]
        external_ip: Option<Ipv4Addr>,
    },
    /// Set (or with no value clear) a chassis' external address for default SNAT.
    ChassisSetExternalIp {
        name: String,
        external_ip: Option<Ipv4Addr>,
    },
    /// Remove a chassis (it must host no port).
    ChassisDel {
        name: String,
    },
    /// Add a logical switch with its 24-bit tunnel key (the VNI).
    LsAdd {
        name: String,
        #[arg(long)]
        key: u32,
        #[arg(long, default_value_t = geneflow_control::model::DEFAULT_MTU)]
        mtu: u32,
        /// Tenant (distribution topic).
        #[arg(long, default_value = DEFAULT_TENANT)]
        tenant: String,
        /// A provider (physical, untunnelled) network: the physnet name chassis map to an
        /// interface with `geneflowd --provider NAME=IFACE`.
        #[arg(long)]
        provider: Option<String>,
        /// With --provider: the 802.1Q VLAN id of the network (none: untagged).
        #[arg(long)]
        vlan: Option<u16>,
    },
    /// Remove a logical switch (it must have no port).
    LsDel {
        name: String,
    },
    /// Add a subnet (CIDR, gateway, DHCP, DNS) to a switch.
    SubnetAdd {
        switch: String,
        name: String,
        cidr: String,
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        #[arg(long)]
        dhcp: bool,
        /// DHCP option as key=value (repeatable).
        #[arg(long = "dhcp-option")]
        dhcp_options: Vec<String>,
        #[arg(long)]
        dns: Vec<Ipv4Addr>,
        /// A route DHCP gives the VMs (option 121), as PREFIX,NEXTHOP (repeatable).
        #[arg(long = "host-route")]
        host_routes: Vec<String>,
    },
    SubnetDel {
        name: String,
    },
    /// Add a logical port to a switch.
    LspAdd {
        switch: String,
        name: String,
        mac: String,
        ips: Vec<Ipv4Addr>,
        /// 15-bit port key, unique within the switch.
        #[arg(long)]
        key: u32,
        /// Security group (repeatable).
        #[arg(long = "sg")]
        security_groups: Vec<String>,
        #[arg(long)]
        no_port_security: bool,
        /// Allowed address pair CIDR[,MAC] (repeatable).
        #[arg(long = "allowed-pair")]
        allowed_pairs: Vec<String>,
    },
    /// Set a port's port security: on (the default) or `--off`, and its allowed address
    /// pairs (replaced by those given).
    LspSetPortSecurity {
        name: String,
        #[arg(long)]
        off: bool,
        /// Allowed address pair CIDR[,MAC] (repeatable).
        #[arg(long = "allowed-pair")]
        allowed_pairs: Vec<String>,
    },
    /// Replace a port's security groups.
    LspSetSg {
        name: String,
        groups: Vec<String>,
    },
    /// Unbind a port from its chassis.
    LspUnbind {
        name: String,
    },
    /// Bind a port to a chassis and a local interface there.
    LspBind {
        name: String,
        chassis: String,
        iface: String,
    },
    /// Remove a logical port.
    LspDel {
        name: String,
    },
    /// Add a logical router with its 24-bit tunnel key.
    LrAdd {
        name: String,
        #[arg(long)]
        key: u32,
        #[arg(long, default_value = DEFAULT_TENANT)]
        tenant: String,
    },
    LrDel {
        name: String,
    },
    /// Add a router port (MAC, address/prefix) attached to a switch.
    LrpAdd {
        router: String,
        name: String,
        mac: String,
        network: String,
        #[arg(long)]
        key: u32,
        #[arg(long)]
        switch: Option<String>,
    },
    LrpDel {
        name: String,
    },
    /// Add a static route to a router.
    LrRouteAdd {
        router: String,
        prefix: String,
        nexthop: Ipv4Addr,
    },
    LrRouteDel {
        router: String,
        prefix: String,
    },
    /// Add a security group.
    SgAdd {
        name: String,
        #[arg(long, default_value = DEFAULT_TENANT)]
        tenant: String,
    },
    SgDel {
        name: String,
    },
    /// Add a rule to a security group.
    SgRuleAdd {
        group: String,
        id: String,
        #[arg(long, value_parser = ["ingress", "egress"])]
        direction: String,
        #[arg(long, default_value = "IPv4", value_parser = ["IPv4", "IPv6"])]
        ethertype: String,
        /// tcp, udp, icmp or a protocol number.
        #[arg(long)]
        protocol: Option<String>,
        /// Port or range: 80 or 8000-8080.
        #[arg(long)]
        ports: Option<String>,
        #[arg(long)]
        remote_prefix: Option<String>,
        #[arg(long)]
        remote_group: Option<String>,
    },
    SgRuleDel {
        group: String,
        id: String,
    },
    /// Add a floating IP: external address -> fixed port, through a router.
    FipAdd {
        name: String,
        external_ip: Ipv4Addr,
        port: String,
        router: String,
    },
    FipDel {
        name: String,
    },
    /// Print the NB contents.
    Show {
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
}
