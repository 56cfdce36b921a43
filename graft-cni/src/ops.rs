//! The CNI commands.

use std::path::Path;

use graft_core::nsrules::NsRules;
use serde_json::Value;

use crate::cni::{self, code, CniError};
use crate::config::{NetConf, Plan};
use crate::graftd;
use crate::record::{self, Record, Store};

/// The CNI_* variables a command got.
#[derive(Debug, Default, Clone)]
pub struct CniEnv {
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
}

fn need<'a>(v: &'a Option<String>, var: &str, cmd: &str) -> Result<&'a str, CniError> {
    v.as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CniError::new(code::INVALID_ENV, format!("{var} is required for {cmd}")))
}

/// What ADD and CHECK start from: the container id, the interface, the
/// pod's namespace (each required, checked in this order), the plan and
/// the record store.
struct Attachment<'a>(&'a str, &'a str, &'a str, Plan, Store);

impl<'a> Attachment<'a> {
    fn open(conf: &NetConf, env: &'a CniEnv, cmd: &str) -> Result<Self, CniError> {
        let cid = need(&env.container_id, "CNI_CONTAINERID", cmd)?;
        let ifname = need(&env.ifname, "CNI_IFNAME", cmd)?;
        let ns_path = need(&env.netns, "CNI_NETNS", cmd)?;
        record::check_key(cid, ifname)?;
        let plan = conf.plan()?;
        let store = Store::new(&conf.data_dir(), &conf.name)?;
        Ok(Attachment(cid, ifname, ns_path, plan, store))
    }
}

/// ADD: the config's endpoints and port mappings in the pod's namespace,
/// then its rules, then the record. A failure undoes what was added.
pub fn add(conf: &NetConf, env: &CniEnv) -> Result<Value, CniError> {
    let Attachment(cid, ifname, ns_path, plan, store) = Attachment::open(conf, env, "ADD")?;
    let pod = graftd::open_ns(ns_path)?;
    let control = conf.control();
    let mut added = Vec::new();
    let undo = |added: &[graft_core::EndpointName], rules: bool| {
        if rules {
            let _ = graftd::set_rules(&control, &pod, &NsRules::default());
        }
        for n in added {
            let _ = graftd::del(&control, &pod, *n);
        }
    };
    for spec in &plan.endpoints {
        if let Err(e) = graftd::add(&control, &pod, spec) {
            undo(&added, false);
            return Err(e);
        }
        added.push(spec.name);
    }
    let rules = !plan.rules.is_empty();
    if rules {
        if let Err(e) = graftd::set_rules(&control, &pod, &plan.rules) {
            undo(&added, false);
            return Err(graftd::cni_error("setting the rules", e));
        }
    }
    let rec = Record {
        container_id: cid.to_owned(),
        ifname: ifname.to_owned(),
        netns: ns_path.to_owned(),
        netns_id: pod.id,
        endpoints: added.clone(),
        rules,
    };
    if let Err(e) = store.save(&rec) {
        undo(&added, rules);
        return Err(e);
    }
    Ok(cni::add_result(
        &conf.cni_version,
        conf.prev_result.as_ref(),
    ))
}

/// Removes what a record (or, without one, the config) registered. Never
/// fails for a namespace or a graftd that is gone: DEL must be idempotent.
fn release(control: &Path, ns_path: Option<&str>, rec: Option<&Record>, plan: Option<&Plan>) {
    let Some(path) = ns_path.or(rec.map(|r| r.netns.as_str())) else {
        return;
    };
    // A vanished namespace took its endpoints with it (graftd forgets a
    // namespace nothing uses).
    let Ok(pod) = graftd::open_ns(path) else {
        return;
    };
    if rec.is_some_and(|r| r.netns_id != pod.id) {
        // Another namespace now lives at this path: not ours to touch.
        return;
    }
    let (names, rules) = match (rec, plan) {
        (Some(r), _) => (r.endpoints.clone(), r.rules),
        (None, Some(p)) => (
            p.endpoints.iter().map(|e| e.name).collect(),
            !p.rules.is_empty(),
        ),
        (None, None) => return,
    };
    if rules {
        if let Err(e) = graftd::set_rules(control, &pod, &NsRules::default()) {
            if graftd::unreachable(&e) {
                return;
            }
        }
    }
    for n in names {
        if let Err(e) = graftd::del(control, &pod, n) {
            if graftd::unreachable(&e) {
                return;
            }
        }
    }
}

pub fn del(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let cid = need(&env.container_id, "CNI_CONTAINERID", "DEL")?;
    let ifname = need(&env.ifname, "CNI_IFNAME", "DEL")?;
    record::check_key(cid, ifname)?;
    let store = Store::new(&conf.data_dir(), &conf.name)?;
    let rec = store.load(cid, ifname)?;
    let plan = conf.plan().ok();
    let ns = env.netns.as_deref().filter(|s| !s.is_empty());
    release(&conf.control(), ns, rec.as_ref(), plan.as_ref());
    store.remove(cid, ifname)
}

fn differs(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// CHECK: the record, the namespace, every endpoint and the rules are as
/// the config says.
pub fn check(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let Attachment(cid, ifname, ns_path, plan, store) = Attachment::open(conf, env, "CHECK")?;
    let rec = store
        .load(cid, ifname)?
        .ok_or_else(|| differs(format!("no attachment {cid}/{ifname}: ADD was not run")))?;
    let pod = graftd::open_ns(ns_path)?;
    if pod.id != rec.netns_id {
        return Err(differs(format!(
            "CNI_NETNS {ns_path} is namespace {}, ADD registered {}",
            pod.id, rec.netns_id
        )));
    }
    let control = conf.control();
    let have =
        graftd::show(&control, &pod).map_err(|e| graftd::cni_error("listing endpoints", e))?;
    for want in &plan.endpoints {
        match have.iter().find(|i| i.spec.name == want.name) {
            None => return Err(differs(format!("endpoint {} is missing", want.name))),
            Some(i) if i.spec != *want => {
                return Err(differs(format!(
                    "endpoint {} is \"{}\", the config says \"{want}\"",
                    want.name, i.spec
                )))
            }
            Some(_) => {}
        }
    }
    let rules =
        graftd::get_rules(&control, &pod).map_err(|e| graftd::cni_error("reading the rules", e))?;
    if rules != plan.rules {
        return Err(differs(format!(
            "the namespace's rules are {rules:?}, the config says {:?}",
            plan.rules
        )));
    }
    Ok(())
}

/// STATUS: ready while graftd answers.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    cni::need_1_1("STATUS", &conf.cni_version)?;
    graftd::ping(&conf.control()).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!(
                "graftd does not answer: {}",
                crate::config::strip_error(&e.to_string())
            ),
        )
    })
}

/// GC: releases every recorded attachment not in `cni.dev/valid-attachments`.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    cni::need_1_1("GC", &conf.cni_version)?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs \"cni.dev/valid-attachments\" in the config",
        )
    })?;
    let store = Store::new(&conf.data_dir(), &conf.name)?;
    let control = conf.control();
    for r in store.all()? {
        let keep = valid
            .iter()
            .any(|a| a.container_id == r.container_id && a.ifname == r.ifname);
        if !keep {
            release(&control, None, Some(&r), None);
            store.remove(&r.container_id, &r.ifname)?;
        }
    }
    Ok(())
}
