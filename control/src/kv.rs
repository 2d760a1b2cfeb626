//! The key/value projection of the NB model, shared by every backend. Records live under
//! distribution topics, so an agent can read and watch only what it needs:
//!
//! - `/gf/global/chassis/<name>`: chassis (every agent needs every tunnel endpoint)
//! - `/gf/t/<tenant>/<table>/<name>`: every tenant-scoped record
//! - `/gf/bind/<chassis>/<port>`: index of the ports bound to a chassis and their tenant,
//!   which tells an agent which tenants to subscribe to.
//!
//! Values are the records' JSON. Each record carries its own version; an update older than
//! what an agent holds is ignored.

use crate::model::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const ROOT: &str = "/gf/";
pub const GLOBAL: &str = "/gf/global/";

pub fn tenant_prefix(t: &str) -> String {
    format!("/gf/t/{t}/")
}

pub fn bind_prefix(chassis: &str) -> String {
    format!("/gf/bind/{chassis}/")
}

/// The topic prefix a key belongs to (also its Redis notification channel).
pub fn topic_of(key: &str) -> Option<String> {
    let rest = key.strip_prefix(ROOT)?;
    let mut it = rest.splitn(3, '/');
    match (it.next()?, it.next()?) {
        ("global", _) => Some(GLOBAL.to_string()),
        ("t", t) => Some(tenant_prefix(t)),
        ("bind", c) => Some(bind_prefix(c)),
        _ => None,
    }
}

/// Whether `prefix` is one topic (as opposed to a wider prefix such as the whole NB's).
pub fn is_topic(prefix: &str) -> bool {
    topic_of(&format!("{prefix}x")).as_deref() == Some(prefix)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub tenant: String,
    #[serde(default)]
    pub version: u64,
}

pub type Kv = BTreeMap<String, Vec<u8>>;

fn put<T: Serialize>(kv: &mut Kv, key: String, v: &T) {
    // Serialising plain records cannot fail.
    kv.insert(key, serde_json::to_vec(v).unwrap_or_default());
}

/// Every key and value of a (strictly valid) document.
pub fn doc_to_kv(doc: &NbDocument) -> Kv {
    let mut kv = Kv::new();
    let sw_tenant = |s: &str| doc.switch_tenant(s).unwrap_or(DEFAULT_TENANT).to_string();
    let lr_tenant = |r: &str| {
        doc.routers
            .get(r)
            .map(|r| r.tenant.clone())
            .unwrap_or_else(|| DEFAULT_TENANT.to_string())
    };
    for c in doc.chassis.values() {
        put(&mut kv, format!("{GLOBAL}chassis/{}", c.name), c);
    }
    for s in doc.switches.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/switches/{}", s.tenant, s.name),
            s,
        );
    }
    for s in doc.subnets.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/subnets/{}", sw_tenant(&s.switch), s.name),
            s,
        );
    }
    for p in doc.ports.values() {
        let t = sw_tenant(&p.switch);
        put(&mut kv, format!("/gf/t/{t}/ports/{}", p.name), p);
        if let Some(c) = &p.chassis {
            put(
                &mut kv,
                format!("/gf/bind/{c}/{}", p.name),
                &Binding {
                    tenant: t,
                    version: p.version,
                },
            );
        }
    }
    for r in doc.routers.values() {
        put(&mut kv, format!("/gf/t/{}/routers/{}", r.tenant, r.name), r);
    }
    for rp in doc.router_ports.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/router_ports/{}", lr_tenant(&rp.router), rp.name),
            rp,
        );
    }
    for r in doc.routes.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/routes/{}", lr_tenant(&r.router), r.name),
            r,
        );
    }
    for g in doc.security_groups.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/security_groups/{}", g.tenant, g.name),
            g,
        );
    }
    for f in doc.floating_ips.values() {
        put(
            &mut kv,
            format!("/gf/t/{}/floating_ips/{}", lr_tenant(&f.router), f.name),
            f,
        );
    }
    kv
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Record { table: &'a str, name: &'a str },
    Binding { chassis: &'a str, port: &'a str },
}

pub fn parse_key(key: &str) -> Option<KeyKind<'_>> {
    let rest = key.strip_prefix(ROOT)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["global", table, name] if !name.is_empty() => Some(KeyKind::Record { table, name }),
        ["t", _tenant, table, name] if !name.is_empty() => Some(KeyKind::Record { table, name }),
        ["bind", chassis, port] if !port.is_empty() => Some(KeyKind::Binding { chassis, port }),
        _ => None,
    }
}

/// The outcome of applying one key to a local view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The record changed (or went away).
    Changed,
    /// An older version than the one held: ignored.
    Stale,
    /// A binding index entry.
    Binding,
}

fn apply_table<T>(
    table: &mut BTreeMap<String, T>,
    name: &str,
    value: Option<&[u8]>,
    version: impl Fn(&T) -> u64,
) -> Result<Applied, String>
where
    T: DeserializeOwned,
{
    match value {
        None => {
            table.remove(name);
            Ok(Applied::Changed)
        }
        Some(v) => {
            let rec: T = serde_json::from_slice(v).map_err(|e| format!("bad JSON: {e}"))?;
            if let Some(old) = table.get(name) {
                if version(old) > version(&rec) {
                    return Ok(Applied::Stale);
                }
            }
            table.insert(name.to_string(), rec);
            Ok(Applied::Changed)
        }
    }
}

/// The largest value a record may have. A port is a few hundred bytes and a security group
/// with a thousand rules about 150 KB; anything bigger is refused by writers and skipped by
/// agents (as a record that does not parse), so a hostile value cannot make every agent
/// allocate and parse it.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Applies a put (`Some`) or delete (`None`) of `key` to `doc`. A record that does not parse
/// (or is larger than `MAX_RECORD_BYTES`) is removed from the view and reported, so the rest
/// keeps working.
pub fn apply(doc: &mut NbDocument, key: &str, value: Option<&[u8]>) -> Result<Applied, String> {
    let kind = parse_key(key).ok_or_else(|| format!("unknown key {key:?}"))?;
    if let Some(v) = value.filter(|v| v.len() > MAX_RECORD_BYTES) {
        let _ = apply(doc, key, None);
        return Err(format!(
            "{key}: value of {} bytes, over the {MAX_RECORD_BYTES}-byte limit",
            v.len()
        ));
    }
    let KeyKind::Record { table, name } = kind else {
        return Ok(Applied::Binding);
    };
    let r = match table {
        "chassis" => apply_table(&mut doc.chassis, name, value, |r| r.version),
        "switches" => apply_table(&mut doc.switches, name, value, |r| r.version),
        "subnets" => apply_table(&mut doc.subnets, name, value, |r| r.version),
        "ports" => apply_table(&mut doc.ports, name, value, |r| r.version),
        "routers" => apply_table(&mut doc.routers, name, value, |r| r.version),
        "router_ports" => apply_table(&mut doc.router_ports, name, value, |r| r.version),
        "routes" => apply_table(&mut doc.routes, name, value, |r| r.version),
        "security_groups" => apply_table(&mut doc.security_groups, name, value, |r| r.version),
        "floating_ips" => apply_table(&mut doc.floating_ips, name, value, |r| r.version),
        other => return Err(format!("unknown table {other:?} in key {key:?}")),
    };
    if r.is_err() {
        // Drop whatever we held under that key: a record we cannot read is not current.
        let _ = apply(doc, key, None);
    }
    r.map_err(|e| format!("{key}: {e}"))
}

/// Builds a document from key/values; returns it and one message per unreadable record.
pub fn kv_to_doc<'a>(
    kvs: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
) -> (NbDocument, Vec<String>) {
    let mut doc = NbDocument::default();
    let mut errors = Vec::new();
    for (k, v) in kvs {
        if let Err(e) = apply(&mut doc, k, Some(v)) {
            errors.push(e);
        }
        doc.version = doc.version.max(record_version(v));
    }
    (doc, errors)
}

fn record_version(v: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct V {
        #[serde(default)]
        version: u64,
    }
    serde_json::from_slice::<V>(v)
        .map(|v| v.version)
        .unwrap_or(0)
}

/// Tenants named by the bindings of `chassis` in `kvs`.
pub fn bound_tenants<'a>(
    chassis: &str,
    kvs: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
) -> BTreeSet<String> {
    let prefix = bind_prefix(chassis);
    kvs.into_iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .filter_map(|(_, v)| serde_json::from_slice::<Binding>(v).ok())
        .map(|b| b.tenant)
        .collect()
}

/// Sets each record's version: unchanged records keep theirs, changed or new ones get the old
/// version + 1.
pub fn bump_versions(old: &NbDocument, new: &mut NbDocument) {
    fn table<T: Serialize + Clone>(
        old: &BTreeMap<String, T>,
        new: &mut BTreeMap<String, T>,
        get: fn(&mut T) -> &mut u64,
    ) {
        for (k, rec) in new.iter_mut() {
            let mut probe = rec.clone();
            *get(&mut probe) = 0;
            let prev = old.get(k).cloned().map(|mut o| {
                let v = *get(&mut o);
                *get(&mut o) = 0;
                (v, serde_json::to_value(&o).ok())
            });
            // Saturating: a record written with a version at the top of the range (by a
            // foreign writer) stays updatable, since agents take an equal version as current.
            let v = match prev {
                Some((v, o)) if o == serde_json::to_value(&probe).ok() => v,
                Some((v, _)) => v.saturating_add(1),
                None => 1,
            };
            *get(rec) = v;
        }
    }
    table(&old.chassis, &mut new.chassis, |r| &mut r.version);
    table(&old.switches, &mut new.switches, |r| &mut r.version);
    table(&old.subnets, &mut new.subnets, |r| &mut r.version);
    table(&old.ports, &mut new.ports, |r| &mut r.version);
    table(&old.routers, &mut new.routers, |r| &mut r.version);
    table(&old.router_ports, &mut new.router_ports, |r| &mut r.version);
    table(&old.routes, &mut new.routes, |r| &mut r.version);
    table(&old.security_groups, &mut new.security_groups, |r| {
        &mut r.version
    });
    table(&old.floating_ips, &mut new.floating_ips, |r| &mut r.version);
}

/// Puts and deletes that turn `old` into `new`.
pub fn diff(old: &Kv, new: &Kv) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let puts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let dels = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    (puts, dels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> NbDocument {
        let mut d = NbDocument::default();
        d.chassis.insert(
            "a".into(),
            Chassis {
                name: "a".into(),
                encap_ip: "198.18.0.1".parse().unwrap(),
                external_ip: None,
                version: 1,
            },
        );
        d.switches.insert(
            "ls".into(),
            LogicalSwitch {
                name: "ls".into(),
                tunnel_key: 5,
                mtu: DEFAULT_MTU,
                tenant: "blue".into(),
                provider: None,
                vlan: None,
                version: 1,
            },
        );
        d.ports.insert(
            "p".into(),
            LogicalPort {
                name: "p".into(),
                switch: "ls".into(),
                mac: "0a:00:00:00:00:01".parse().unwrap(),
                ips: vec![],
                port_key: 1,
                chassis: Some("a".into()),
                iface: Some("tap0".into()),
                security_groups: vec![],
                port_security: true,
                allowed_address_pairs: vec![],
                version: 1,
            },
        );
        d
    }

    #[test]
    fn an_oversized_value_is_skipped_and_drops_the_held_record() {
        let mut d = doc();
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        let e = apply(&mut d, "/gf/t/blue/ports/p", Some(&big)).unwrap_err();
        assert!(
            e.starts_with("/gf/t/blue/ports/p: value of 1048577 bytes"),
            "{e}"
        );
        assert!(!d.ports.contains_key("p"));
    }

    #[test]
    fn versions_saturate_at_the_top_of_the_range() {
        let mut old = doc();
        old.ports.get_mut("p").unwrap().version = u64::MAX;
        let mut new = old.clone();
        new.ports.get_mut("p").unwrap().port_security = false;
        bump_versions(&old, &mut new);
        assert_eq!(new.ports["p"].version, u64::MAX);
        // An agent holding the old record takes the update (equal versions are current).
        let mut held = old.clone();
        let v = serde_json::to_vec(&new.ports["p"]).unwrap();
        assert_eq!(
            apply(&mut held, "/gf/t/blue/ports/p", Some(&v)),
            Ok(Applied::Changed)
        );
        assert!(!held.ports["p"].port_security);
    }

    #[test]
    fn round_trip_through_kv() {
        let d = doc();
        let kv = doc_to_kv(&d);
        assert!(kv.contains_key("/gf/global/chassis/a"));
        assert!(kv.contains_key("/gf/t/blue/switches/ls"));
        assert!(kv.contains_key("/gf/t/blue/ports/p"));
        assert!(kv.contains_key("/gf/bind/a/p"));
        let (back, errs) = kv_to_doc(&kv);
        assert!(errs.is_empty());
        assert_eq!(back.ports, d.ports);
        assert_eq!(
            bound_tenants("a", &kv),
            BTreeSet::from(["blue".to_string()])
        );
        assert_eq!(topic_of("/gf/t/blue/ports/p").unwrap(), "/gf/t/blue/");
    }

    #[test]
    fn stale_updates_are_ignored_and_bad_json_is_dropped() {
        let mut d = doc();
        let mut older = d.ports["p"].clone();
        older.version = 0;
        older.port_key = 9;
        let v = serde_json::to_vec(&older).unwrap();
        assert_eq!(
            apply(&mut d, "/gf/t/blue/ports/p", Some(&v)),
            Ok(Applied::Stale)
        );
        assert_eq!(d.ports["p"].port_key, 1);
        assert!(apply(&mut d, "/gf/t/blue/ports/p", Some(b"{nope")).is_err());
        assert!(!d.ports.contains_key("p"));
    }

    #[test]
    fn versions_bump_only_on_change() {
        let old = doc();
        let mut new = old.clone();
        new.ports.get_mut("p").unwrap().port_key = 2;
        new.ports.get_mut("p").unwrap().version = 0;
        new.switches.get_mut("ls").unwrap().version = 0;
        bump_versions(&old, &mut new);
        assert_eq!(new.ports["p"].version, 2);
        assert_eq!(new.switches["ls"].version, 1);
        let (puts, dels) = diff(&doc_to_kv(&old), &doc_to_kv(&new));
        assert_eq!(puts.len(), 2); // the port and its binding
        assert!(dels.is_empty());
    }
}
