//! The CNI spec's vocabulary: versions, error codes, error and result JSON.

use serde_json::{json, Value};

/// Spec versions graft-cni speaks (CHECK exists since 0.4.0; STATUS and GC
/// since 1.1.0).
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The newest of them.
pub const CURRENT: &str = "1.1.0";

/// Error codes of the spec, and ours (100 and up are the plugin's own).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_CONFIG: u32 = 4;
    pub const INVALID_ENV: u32 = 7;
    pub const IO: u32 = 5;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// graftd refused a request (its own words follow).
    pub const GRAFTD_REFUSED: u32 = 100;
    /// CHECK found the attachment different from its configuration.
    pub const CHECK_FAILED: u32 = 101;
}

/// A failure, as the runtime receives it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// The error JSON for `version` (the config's when it was readable).
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// Checks that `v` is a version we speak.
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CNI version \"{v}\" is not supported (graft-cni speaks {})",
                SUPPORTED.join(", ")
            ),
        ))
    }
}

/// STATUS and GC exist from 1.1.0 on.
pub fn need_1_1(cmd: &str, v: &str) -> Result<(), CniError> {
    if v == "1.1.0" {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{cmd} needs cniVersion 1.1.0 (the config says \"{v}\")"),
        ))
    }
}

/// What ADD prints: the previous plugin's result unchanged when chained
/// (graft-cni adds no interface and no address), else the smallest valid
/// result of the requested version.
pub fn add_result(version: &str, prev: Option<&Value>) -> Value {
    match prev {
        Some(p) => p.clone(),
        None => json!({"cniVersion": version, "dns": {}}),
    }
}

/// VERSION's answer.
pub fn version_info() -> Value {
    json!({"cniVersion": CURRENT, "supportedVersions": SUPPORTED})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for v in SUPPORTED {
            check_version(v).unwrap();
        }
        let e = check_version("0.3.1").unwrap_err();
        assert_eq!(e.code, 1);
        assert_eq!(
            e.msg,
            "CNI version \"0.3.1\" is not supported (graft-cni speaks 0.4.0, 1.0.0, 1.1.0)"
        );
        assert_eq!(need_1_1("STATUS", "1.0.0").unwrap_err().code, 1);
    }

    #[test]
    fn error_json() {
        let mut e = CniError::new(4, "bad");
        e.details = "more".into();
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion":"1.0.0","code":4,"msg":"bad","details":"more"})
        );
        assert_eq!(
            CniError::new(50, "x").to_json("1.1.0"),
            json!({"cniVersion":"1.1.0","code":50,"msg":"x"})
        );
    }

    #[test]
    fn results() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[]});
        assert_eq!(add_result("1.0.0", Some(&prev)), prev);
        assert_eq!(
            add_result("0.4.0", None),
            json!({"cniVersion":"0.4.0","dns":{}})
        );
    }
}
