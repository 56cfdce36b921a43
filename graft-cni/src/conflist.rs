//! `graft-cni conflist NETD_DIR OUT_NAME`: writes a conflist that chains
//! graft-cni after the cluster's own plugins (the DaemonSet's init container
//! runs it on each node).
//!
//! It takes the first `*.conflist` or `*.conf` in NETD_DIR by name (other
//! than OUT_NAME), appends graft-cni to its plugins (dropping `portmap`,
//! whose `portMappings` graft-cni serves instead, and any graft-cni already
//! there), and writes NETD_DIR/OUT_NAME atomically. graft-cni's settings come
//! from the environment: `GRAFT_CNI_ENDPOINTS`, `GRAFT_CNI_INGRESS`,
//! `GRAFT_CNI_EGRESS`, `GRAFT_CNI_EXCLUDE` (JSON lists) and
//! `GRAFT_CNI_CONTROL` (graftd's control socket). The result is checked the
//! way ADD would check it before anything is written.

use std::path::Path;

use serde_json::{json, Map, Value};

/// Why no conflist was written.
#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    /// The cluster's plugin has not written its configuration yet.
    #[error("no CNI configuration in {0} yet")]
    NotYet(String),
    #[error("{0}")]
    Failed(String),
}

impl ConflistError {
    /// 3 for "not yet" (worth retrying), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConflistError::NotYet(_) => 3,
            ConflistError::Failed(_) => 1,
        }
    }
}

fn failed(s: impl Into<String>) -> ConflistError {
    ConflistError::Failed(s.into())
}

/// The conflist for the cluster's `base` config; `env` gives the settings.
pub fn chain(base: Value, env: &dyn Fn(&str) -> Option<String>) -> Result<Value, ConflistError> {
    let Value::Object(mut conf) = base else {
        return Err(failed("the cluster's configuration is not a JSON object"));
    };
    if !conf.contains_key("plugins") {
        // A single-plugin .conf becomes a list of one.
        let mut single = Map::new();
        for (k, v) in conf.iter() {
            if k != "cniVersion" && k != "name" {
                single.insert(k.clone(), v.clone());
            }
        }
        conf.retain(|k, _| k == "cniVersion" || k == "name");
        conf.insert("plugins".into(), Value::Array(vec![Value::Object(single)]));
    }
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    let name = conf
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| failed("the cluster's configuration has no \"name\""))?
        .to_owned();
    let Some(Value::Array(plugins)) = conf.get_mut("plugins") else {
        return Err(failed("\"plugins\" is not a list"));
    };
    plugins.retain(|p| {
        !matches!(
            p.get("type").and_then(Value::as_str),
            Some("graft-cni" | "portmap")
        )
    });
    let mut graft = json!({
        "type": "graft-cni",
        "capabilities": {"portMappings": true},
        "controlSocket": env("GRAFT_CNI_CONTROL").unwrap_or_else(|| graft_core::DEFAULT_CONTROL_PATH.to_owned()),
        "endpoints": [],
    });
    for (key, var) in [
        ("endpoints", "GRAFT_CNI_ENDPOINTS"),
        ("ingress", "GRAFT_CNI_INGRESS"),
        ("egress", "GRAFT_CNI_EGRESS"),
        ("exclude", "GRAFT_CNI_EXCLUDE"),
    ] {
        if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
            let parsed: Value =
                serde_json::from_str(&v).map_err(|e| failed(format!("{var}: {e}")))?;
            graft[key] = parsed;
        }
    }
    // Check graft-cni's part as ADD will see it.
    let mut probe = graft.clone();
    probe["cniVersion"] = json!(version);
    probe["name"] = json!(name);
    let text = probe.to_string();
    crate::config::parse(text.as_bytes())
        .and_then(|c| c.plan())
        .map_err(|e| failed(format!("graft-cni's settings: {}", e.msg)))?;
    plugins.push(graft);
    Ok(Value::Object(conf))
}

/// Reads the cluster's configuration from `netd`, writes `netd/out`.
pub fn write(
    netd: &Path,
    out: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConflistError> {
    let rd = std::fs::read_dir(netd)
        .map_err(|e| failed(format!("cannot list {}: {e}", netd.display())))?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n != out && !n.starts_with('.') && (n.ends_with(".conflist") || n.ends_with(".conf"))
        })
        .collect();
    names.sort();
    let Some(first) = names.first() else {
        return Err(ConflistError::NotYet(netd.display().to_string()));
    };
    let src = netd.join(first);
    let text =
        std::fs::read(&src).map_err(|e| failed(format!("cannot read {}: {e}", src.display())))?;
    let base: Value = serde_json::from_slice(&text)
        .map_err(|e| failed(format!("{} is not JSON: {e}", src.display())))?;
    let conf = chain(base, env)?;
    let tmp = netd.join(format!(".{out}.tmp"));
    let mut body = serde_json::to_vec_pretty(&conf).map_err(|e| failed(e.to_string()))?;
    body.push(b'\n');
    std::fs::write(&tmp, body)
        .map_err(|e| failed(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, netd.join(out))
        .map_err(|e| failed(format!("cannot rename {}: {e}", tmp.display())))?;
    Ok(format!("{out} chains graft-cni after {first}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn chains_after_the_cluster_plugins() {
        let base = json!({"cniVersion":"1.0.0","name":"k8s","plugins":[
            {"type":"bridge","bridge":"cni0"},
            {"type":"portmap","capabilities":{"portMappings":true}},
            {"type":"graft-cni"}]});
        let out = chain(
            base,
            &env(&[
                (
                    "GRAFT_CNI_ENDPOINTS",
                    r#"[{"name":"ep-out4","type":"ipv4","addr":"0.0.0.0","port":"dynamic"}]"#,
                ),
                ("GRAFT_CNI_EGRESS", r#"["0.0.0.0/0=ep-out4"]"#),
            ]),
        )
        .unwrap();
        let types: Vec<&str> = out["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "graft-cni"]);
        assert_eq!(out["plugins"][1]["egress"], json!(["0.0.0.0/0=ep-out4"]));
        assert_eq!(out["plugins"][1]["controlSocket"], "/run/graft/graftd.sock");
    }

    #[test]
    fn single_conf_and_bad_settings() {
        let base = json!({"cniVersion":"0.4.0","name":"k","type":"ptp","ipam":{}});
        let out = chain(base.clone(), &env(&[])).unwrap();
        assert_eq!(out["plugins"][0], json!({"type":"ptp","ipam":{}}));
        assert_eq!(out["plugins"][1]["type"], "graft-cni");
        assert!(out.get("type").is_none());
        let e = chain(base, &env(&[("GRAFT_CNI_EGRESS", r#"["0.0.0.0/0=ep"]"#)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "graft-cni's settings: rules given without any endpoint: add \"endpoints\" or port mappings"
        );
        assert_eq!(e.exit_code(), 1);
    }
}
