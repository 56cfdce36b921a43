//! `--key value` / `--flag` parsing, shared by every subcommand.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// Flags that take no value.
const SWITCHES: &[&str] = &["once", "oob"];

pub struct Args {
    kv: HashMap<String, String>,
}

impl Args {
    pub fn parse(argv: &[String]) -> std::result::Result<Self, String> {
        let mut kv = HashMap::new();
        let mut it = argv.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument `{k}`"))?;
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
            .ok_or_else(|| anyhow!("--{key} ADDR:PORT is required"))?;
        v.parse()
            .with_context(|| format!("--{key} `{v}` is not ADDR:PORT"))
    }

    pub fn num(&self, key: &str, default: u64) -> Result<u64> {
        match self.kv.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .with_context(|| format!("--{key} `{v}` is not a number")),
        }
    }

    pub fn secs(&self, key: &str, default: f64) -> Result<Duration> {
        let s = match self.kv.get(key) {
            None => default,
            Some(v) => v
                .parse::<f64>()
                .with_context(|| format!("--{key} `{v}` is not a number of seconds"))?,
        };
        if !(s > 0.0 && s < 86_400.0) {
            return Err(anyhow!("--{key} must be between 0 and 86400 seconds"));
        }
        Ok(Duration::from_secs_f64(s))
    }
}
