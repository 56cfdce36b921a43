//! graftd's state: one endpoint table per network namespace.
//!
//! A namespace is known while it has at least one endpoint. Its entry holds the
//! namespace's descriptor (so its identity cannot be reused while graftd
//! refers to it) and its endpoints; each endpoint holds its target: graftd's
//! own namespace, or a factory worker living in another one (which holds that
//! namespace's descriptor). Removing the last endpoint forgets the namespace.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use graft_core::endpoint::EndpointError;
use graft_core::nsrules::{NsRules, NsRulesError};
use graft_core::proto::control::{self, EndpointInfo, Stats, MAX_ENDPOINTS_PER_NETNS, MAX_MESSAGE};
use graft_core::{EndpointName, EndpointSpec, NetnsId};

use crate::ebpf_hooks::EndpointRef;
use crate::factory::TargetWorker;

/// Longest `netns` display string an endpoint may carry (it is only shown).
pub const MAX_NETNS_LABEL: usize = 256;

/// Why a table change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("endpoint {0} already exists")]
    Exists(EndpointName),
    #[error("endpoint {0} does not exist")]
    NotFound(EndpointName),
    #[error("this network namespace already has {0} endpoints (the most it may have)")]
    Full(usize),
    #[error(
        "the endpoint table of this network namespace would not fit a {MAX_MESSAGE}-byte reply"
    )]
    TooBig,
    #[error("netns label is longer than {MAX_NETNS_LABEL} bytes")]
    LabelTooLong,
    #[error("invalid endpoint: {0}")]
    Invalid(#[from] EndpointError),
    #[error("this network namespace has no endpoints: add them before its rules")]
    NoEndpoints,
    #[error("invalid rules: {0}")]
    Rules(#[from] NsRulesError),
}

impl StateError {
    pub fn errno(&self) -> i32 {
        match self {
            StateError::Exists(_) => libc::EEXIST,
            StateError::NotFound(_) | StateError::NoEndpoints => libc::ENOENT,
            StateError::Full(_) | StateError::TooBig => libc::ENOSPC,
            StateError::LabelTooLong | StateError::Invalid(_) | StateError::Rules(_) => {
                libc::EINVAL
            }
        }
    }
}

/// Where an endpoint's sockets are made.
#[derive(Debug, Clone)]
pub enum Target {
    /// graftd's own namespace: made by the broker thread itself.
    Own,
    /// Another namespace, through its worker.
    Foreign(Arc<TargetWorker>),
}

/// graftd's own counters of one endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    pub sockets: AtomicU64,
    pub refused: AtomicU64,
}

/// One endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Unique for the daemon's lifetime (a re-added name gets a new id).
    pub id: u64,
    /// The namespace whose table holds it (whose broker serves it).
    pub netns: NetnsId,
    pub spec: EndpointSpec,
    pub target_id: NetnsId,
    pub target: Target,
    pub counters: Counters,
    /// Most live sockets (its own `limit`, or graftd's default for inet
    /// endpoints; `None`: unlimited).
    pub limit: Option<u32>,
}

impl Endpoint {
    pub fn hook_ref(&self) -> EndpointRef<'_> {
        EndpointRef {
            id: self.id,
            name: &self.spec.name,
            netns: self.netns,
            target: self.target_id,
            addr: &self.spec.addr,
            policy: &self.spec.policy,
            limit: self.limit,
            own_limit: self.spec.limit.is_some(),
        }
    }

    pub fn count(&self, ok: bool) {
        let c = if ok {
            &self.counters.sockets
        } else {
            &self.counters.refused
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        Stats {
            sockets: self.counters.sockets.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }

    pub fn info(&self, stats: Stats) -> EndpointInfo {
        EndpointInfo {
            spec: self.spec.clone(),
            target_netns: self.target_id,
            stats,
        }
    }
}

/// One known namespace.
#[derive(Debug)]
pub struct NsEntry {
    /// Keeps the namespace alive while graftd serves it.
    _fd: OwnedFd,
    pub endpoints: BTreeMap<EndpointName, Arc<Endpoint>>,
    /// The namespace's own mapping rules (canonical; empty when none), which
    /// `graft -- CMD` without flags fetches from the broker. They live and
    /// die with the namespace's endpoints.
    pub rules: NsRules,
}

/// All endpoint tables.
#[derive(Debug)]
pub struct State {
    own: NetnsId,
    next_id: u64,
    netns: HashMap<NetnsId, NsEntry>,
    workers: HashMap<NetnsId, Weak<TargetWorker>>,
    max_endpoints: usize,
    default_limit: Option<u32>,
}

/// Largest encoded size an endpoint can take in a `show` reply (all counters
/// at their maximum), so accepted tables always fit one record.
fn worst_case_size(spec: &EndpointSpec, target: NetnsId) -> usize {
    let m = Some(u64::MAX);
    let info = EndpointInfo {
        spec: spec.clone(),
        target_netns: target,
        stats: Stats {
            sockets: u64::MAX,
            refused: u64::MAX,
            policy_denied: m,
            active_established: m,
            passive_established: m,
            bytes_sent: m,
            bytes_received: m,
            spliced_bytes: m,
            live: m,
            // A limit never exceeds this (graft-core checks it).
            limit: Some(u64::from(graft_core::endpoint::MAX_LIMIT)),
        },
    };
    // One comma between array elements.
    control::encode(&info).len() + 1
}

/// Room kept for the reply's envelope (`{"status":"ok","netns":{…},"endpoints":[]}`).
const ENVELOPE: usize = 128;

impl State {
    pub fn new(own: NetnsId) -> Self {
        State {
            own,
            next_id: 1,
            netns: HashMap::new(),
            workers: HashMap::new(),
            max_endpoints: MAX_ENDPOINTS_PER_NETNS,
            default_limit: None,
        }
    }

    #[cfg(test)]
    fn with_max_endpoints(own: NetnsId, max: usize) -> Self {
        State {
            max_endpoints: max,
            ..State::new(own)
        }
    }

    /// The limit inet endpoints without their own get (`None`: unlimited).
    pub fn set_default_limit(&mut self, l: Option<u32>) {
        self.default_limit = l;
    }

    /// graftd's own namespace.
    pub fn own(&self) -> NetnsId {
        self.own
    }

    pub fn has(&self, ns: NetnsId) -> bool {
        self.netns.contains_key(&ns)
    }

    /// Checks that `spec` may be added to the table of `ns`.
    pub fn check_add(
        &self,
        ns: NetnsId,
        spec: &EndpointSpec,
        target: NetnsId,
    ) -> Result<(), StateError> {
        spec.validate()?;
        if spec
            .netns
            .as_ref()
            .is_some_and(|l| l.len() > MAX_NETNS_LABEL)
        {
            return Err(StateError::LabelTooLong);
        }
        let Some(entry) = self.netns.get(&ns) else {
            return if ENVELOPE + worst_case_size(spec, target) > MAX_MESSAGE {
                Err(StateError::TooBig)
            } else {
                Ok(())
            };
        };
        if entry.endpoints.contains_key(&spec.name) {
            return Err(StateError::Exists(spec.name));
        }
        if entry.endpoints.len() >= self.max_endpoints {
            return Err(StateError::Full(self.max_endpoints));
        }
        let used: usize = entry
            .endpoints
            .values()
            .map(|e| worst_case_size(&e.spec, e.target_id))
            .sum();
        if ENVELOPE + used + worst_case_size(spec, target) > MAX_MESSAGE {
            return Err(StateError::TooBig);
        }
        Ok(())
    }

    /// A live worker for namespace `id`, if some endpoint still uses one.
    pub fn worker(&self, id: NetnsId) -> Option<Arc<TargetWorker>> {
        self.workers.get(&id).and_then(Weak::upgrade)
    }

    /// Remembers a worker so later endpoints targeting the same namespace
    /// share it.
    pub fn remember_worker(&mut self, w: &Arc<TargetWorker>) {
        self.workers.retain(|_, v| v.strong_count() > 0);
        self.workers.insert(w.id(), Arc::downgrade(w));
    }

    /// Adds an endpoint after [`State::check_add`] passed. `ns_fd` is needed
    /// (and kept) when the namespace is new; otherwise it is dropped.
    pub fn insert(
        &mut self,
        ns: NetnsId,
        ns_fd: OwnedFd,
        spec: EndpointSpec,
        target_id: NetnsId,
        target: Target,
    ) -> Arc<Endpoint> {
        let id = self.next_id;
        self.next_id += 1;
        let limit = match spec.addr {
            graft_core::EndpointAddr::Unix { .. } => None,
            _ => spec.limit.or(self.default_limit),
        };
        let ep = Arc::new(Endpoint {
            limit,
            id,
            netns: ns,
            spec,
            target_id,
            target,
            counters: Counters::default(),
        });
        let entry = self.netns.entry(ns).or_insert_with(|| NsEntry {
            _fd: ns_fd,
            endpoints: BTreeMap::new(),
            rules: NsRules::default(),
        });
        entry.endpoints.insert(ep.spec.name, ep.clone());
        ep
    }

    /// Removes an endpoint; the flag says whether its namespace is now empty
    /// (and therefore forgotten).
    pub fn remove(
        &mut self,
        ns: NetnsId,
        name: &EndpointName,
    ) -> Result<(Arc<Endpoint>, bool), StateError> {
        let entry = self.netns.get_mut(&ns).ok_or(StateError::NotFound(*name))?;
        let ep = entry
            .endpoints
            .remove(name)
            .ok_or(StateError::NotFound(*name))?;
        let emptied = entry.endpoints.is_empty();
        if emptied {
            self.netns.remove(&ns);
        }
        Ok((ep, emptied))
    }

    pub fn lookup(&self, ns: NetnsId, name: &EndpointName) -> Option<Arc<Endpoint>> {
        self.netns.get(&ns)?.endpoints.get(name).cloned()
    }

    /// The endpoints of `ns`, by name.
    pub fn list(&self, ns: NetnsId) -> Vec<Arc<Endpoint>> {
        self.netns
            .get(&ns)
            .map(|e| e.endpoints.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces the rules of `ns` (which must have an endpoint) with the
    /// canonical form of `rules`; empty lists clear them.
    pub fn set_rules(&mut self, ns: NetnsId, rules: &NsRules) -> Result<(), StateError> {
        let canonical = rules.canonical()?;
        let entry = self.netns.get_mut(&ns).ok_or(StateError::NoEndpoints)?;
        entry.rules = canonical;
        Ok(())
    }

    /// The rules of `ns` (empty when it has none or is unknown).
    pub fn rules(&self, ns: NetnsId) -> NsRules {
        self.netns
            .get(&ns)
            .map(|e| e.rules.clone())
            .unwrap_or_default()
    }

    /// Every namespace with endpoints.
    pub fn known(&self) -> Vec<NetnsId> {
        self.netns.keys().copied().collect()
    }

    /// Every endpoint as (namespace, name).
    pub fn all(&self) -> Vec<(NetnsId, EndpointName)> {
        self.netns
            .iter()
            .flat_map(|(id, e)| e.endpoints.keys().map(move |n| (*id, *n)))
            .collect()
    }

    /// Every table as saved on disk (namespaces and endpoints in a stable
    /// order, so an unchanged table is rewritten byte for byte).
    pub fn records(&self) -> Vec<crate::persist::NsRecord> {
        let mut v: Vec<crate::persist::NsRecord> = self
            .netns
            .iter()
            .map(|(id, e)| crate::persist::NsRecord {
                netns: *id,
                endpoints: e
                    .endpoints
                    .values()
                    .map(|ep| crate::persist::EpRecord {
                        spec: ep.spec.clone(),
                        target: ep.target_id,
                    })
                    .collect(),
                rules: e.rules.clone(),
            })
            .collect();
        v.sort_by_key(|r| r.netns);
        v
    }

    /// Drops a namespace and all its endpoints.
    pub fn forget(&mut self, ns: NetnsId) -> Option<NsEntry> {
        self.netns.remove(&ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::EndpointAddr;

    fn fd() -> OwnedFd {
        std::fs::File::open("/proc/self/ns/net").unwrap().into()
    }

    fn spec(name: &str) -> EndpointSpec {
        EndpointSpec {
            name: EndpointName::new(name).unwrap(),
            addr: EndpointAddr::Ipv4 {
                addr: "127.0.0.1".parse().unwrap(),
                port: Some(8080),
            },
            netns: None,
            policy: vec![],
            limit: None,
        }
    }

    const A: NetnsId = NetnsId { dev: 4, ino: 100 };
    const B: NetnsId = NetnsId { dev: 4, ino: 200 };
    const OWN: NetnsId = NetnsId { dev: 4, ino: 1 };

    fn add(st: &mut State, ns: NetnsId, name: &str) -> Result<Arc<Endpoint>, StateError> {
        let s = spec(name);
        st.check_add(ns, &s, OWN)?;
        Ok(st.insert(ns, fd(), s, OWN, Target::Own))
    }

    #[test]
    fn names_are_unique_per_namespace_only() {
        let mut st = State::new(OWN);
        add(&mut st, A, "ep-in4").unwrap();
        assert_eq!(
            add(&mut st, A, "ep-in4").unwrap_err(),
            StateError::Exists(EndpointName::new("ep-in4").unwrap())
        );
        assert_eq!(
            add(&mut st, A, "ep-in4").unwrap_err().to_string(),
            "endpoint ep-in4 already exists"
        );
        add(&mut st, B, "ep-in4").unwrap();
        let name = EndpointName::new("ep-in4").unwrap();
        assert_eq!(st.lookup(A, &name).unwrap().netns, A);
        assert_eq!(st.lookup(B, &name).unwrap().netns, B);
        assert!(st.lookup(NetnsId { dev: 4, ino: 300 }, &name).is_none());
    }

    #[test]
    fn rules_live_with_the_namespace_endpoints() {
        let mut st = State::new(OWN);
        let r = NsRules {
            ingress: vec![":::80=a".into()],
            ..NsRules::default()
        };
        assert_eq!(st.set_rules(A, &r), Err(StateError::NoEndpoints));
        add(&mut st, A, "a").unwrap();
        st.set_rules(A, &r).unwrap();
        assert_eq!(st.rules(A).ingress, ["[::]:80=a"], "kept canonical");
        assert!(st.rules(B).is_empty());
        let bad = NsRules {
            egress: vec!["10.0.0.0/8".into()],
            ..NsRules::default()
        };
        assert!(matches!(st.set_rules(A, &bad), Err(StateError::Rules(_))));
        assert_eq!(
            st.rules(A).ingress,
            ["[::]:80=a"],
            "a refused set changes nothing"
        );
        st.remove(A, &EndpointName::new("a").unwrap()).unwrap();
        add(&mut st, A, "a").unwrap();
        assert!(st.rules(A).is_empty(), "forgotten with the last endpoint");
    }

    #[test]
    fn ids_are_never_reused() {
        let mut st = State::new(OWN);
        let a = add(&mut st, A, "x").unwrap().id;
        st.remove(A, &EndpointName::new("x").unwrap()).unwrap();
        let b = add(&mut st, A, "x").unwrap().id;
        assert_ne!(a, b);
    }

    #[test]
    fn removing_the_last_endpoint_forgets_the_namespace() {
        let mut st = State::new(OWN);
        add(&mut st, A, "a").unwrap();
        add(&mut st, A, "b").unwrap();
        let (_, emptied) = st.remove(A, &EndpointName::new("a").unwrap()).unwrap();
        assert!(!emptied);
        assert!(st.has(A));
        let (_, emptied) = st.remove(A, &EndpointName::new("b").unwrap()).unwrap();
        assert!(emptied);
        assert!(!st.has(A));
        let e = st.remove(A, &EndpointName::new("b").unwrap()).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        assert_eq!(e.to_string(), "endpoint b does not exist");
    }

    #[test]
    fn table_size_is_bounded() {
        let mut st = State::with_max_endpoints(OWN, 3);
        for i in 0..3 {
            add(&mut st, A, &format!("e{i}")).unwrap();
        }
        let e = add(&mut st, A, "one-more").unwrap_err();
        assert_eq!(e, StateError::Full(3));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(st.list(A).len(), 3);
        // With the real limits, the reply budget binds first for small
        // endpoints whose counters could all reach u64::MAX.
        let mut st = State::new(OWN);
        let mut n = 0;
        let e = loop {
            match add(&mut st, A, &format!("e{n}")) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
            assert!(n <= MAX_ENDPOINTS_PER_NETNS);
        };
        assert_eq!(e, StateError::TooBig);
        // 141 since show also carries spliced_bytes (150 before).
        assert!(n >= 140, "only {n} endpoints fit");
    }

    #[test]
    fn show_reply_always_fits_a_record() {
        let mut st = State::new(OWN);
        let mut s = spec("big");
        s.netns = Some("n".repeat(MAX_NETNS_LABEL));
        s.addr = EndpointAddr::Ipv6 {
            addr: "2001:db8:1234:5678:9abc:def0:1234:5678".parse().unwrap(),
            port: Some(65535),
        };
        let mut n = 0;
        loop {
            let mut s = s.clone();
            s.name = EndpointName::new(&format!("big{n}")).unwrap();
            match st.check_add(A, &s, OWN) {
                Ok(()) => {
                    st.insert(A, fd(), s, OWN, Target::Own);
                    n += 1;
                }
                Err(e) => {
                    assert_eq!(e, StateError::TooBig);
                    break;
                }
            }
            assert!(n <= MAX_ENDPOINTS_PER_NETNS);
        }
        assert!(n > 10);
        let reply = control::Reply::Ok {
            netns: A,
            endpoints: st
                .list(A)
                .iter()
                .map(|e| {
                    let mut s = e.stats();
                    s.sockets = u64::MAX;
                    s.refused = u64::MAX;
                    s.policy_denied = Some(u64::MAX);
                    s.active_established = Some(u64::MAX);
                    s.passive_established = Some(u64::MAX);
                    s.bytes_sent = Some(u64::MAX);
                    s.bytes_received = Some(u64::MAX);
                    e.info(s)
                })
                .collect(),
        };
        let dev_max = control::Reply::Ok {
            netns: NetnsId {
                dev: u64::MAX,
                ino: u64::MAX,
            },
            endpoints: vec![],
        };
        assert!(control::encode(&dev_max).len() < ENVELOPE);
        assert!(control::encode(&reply).len() <= MAX_MESSAGE);
    }

    #[test]
    fn invalid_addresses_and_labels_are_refused() {
        let st = State::new(OWN);
        let mut s = spec("u");
        s.addr = EndpointAddr::Unix {
            path: "rel/path".into(),
        };
        assert_eq!(st.check_add(A, &s, OWN).unwrap_err().errno(), libc::EINVAL);
        let mut s = spec("l");
        s.netns = Some("x".repeat(MAX_NETNS_LABEL + 1));
        assert_eq!(
            st.check_add(A, &s, OWN).unwrap_err(),
            StateError::LabelTooLong
        );
    }
}
