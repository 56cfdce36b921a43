//! `--key value` / `--flag` parsing, shared by every subcommand: each
//! subcommand names the options it takes, anything else is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

/// Flags that take no value.
const SWITCHES: &[&str] = &["once", "oob"];

/// Bad input on the command line (main exits 2 on it, not 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn bad(msg: String) -> anyhow::Error {
    BadInput(msg).into()
}

pub struct Args {
    kv: HashMap<String, String>,
}

impl Args {
    /// Parses `argv` for a subcommand that takes the options in `known`.
    pub fn parse(argv: &[String], known: &[&str]) -> std::result::Result<Self, String> {
        let mut kv = HashMap::new();
        let mut it = argv.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument `{k}`"))?;
            if !known.contains(&key) {
                return Err(format!("unknown option `{k}`"));
            }
            if SWITCHES.contains(&key) {
                kv.insert(key.to_owned(), String::new());
                continue;
            }
            let v = it.next().ok_or_else(|| format!("`{k}` needs a value"))?;
            kv.insert(key.to_owned(), v.clone());
        }
        Ok(Args { kv })
    }

    pub fn flag(&self, key: &str) -> bool {
        self.kv.contains_key(key)
    }

    pub fn addr(&self, key: &str) -> Result<SocketAddr> {
        let v = self
            .kv
            .get(key)
            .ok_or_else(|| bad(format!("--{key} ADDR:PORT is required")))?;
        v.parse()
            .map_err(|_| bad(format!("--{key} `{v}` is not ADDR:PORT")))
    }

    pub fn num(&self, key: &str, default: u64) -> Result<u64> {
        match self.kv.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| bad(format!("--{key} `{v}` is not a number"))),
        }
    }

    pub fn secs(&self, key: &str, default: f64) -> Result<Duration> {
        let s = match self.kv.get(key) {
            None => default,
            Some(v) => v
                .parse::<f64>()
                .map_err(|_| bad(format!("--{key} `{v}` is not a number of seconds")))?,
        };
        if !(s > 0.0 && s < 86_400.0) {
            return Err(bad(format!("--{key} must be between 0 and 86400 seconds")));
        }
        Ok(Duration::from_secs_f64(s))
    }
}
