//! The process's configuration, read from the environment once (in the
//! constructor; an exec'd image reads it again in its own constructor).

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use graft_core::rules::{RuleError, RuleSet};
use graft_core::{
    DEFAULT_BROKER_NAME, DEFAULT_WAIT_MS, ENV_BROKER, ENV_EGRESS, ENV_EGRESS_EXCLUDE,
    ENV_GETSOCKNAME, ENV_INGRESS, ENV_POOL, ENV_VERBOSE, ENV_WAIT, MAX_WAIT_MS,
};

/// Everything the interposed calls consult.
pub struct Config {
    pub rules: RuleSet,
    /// Set when the environment is unusable: every AF_INET/AF_INET6 bind and
    /// connect then fails with EINVAL and this line is printed once.
    pub bad: Option<String>,
    pub verbose: bool,
    /// `GRAFT_GETSOCKNAME=app`.
    pub getsockname_app: bool,
    /// The broker's abstract name, without the leading NUL.
    pub broker: String,
    /// Egress sockets without options come from the per-process pool
    /// (`GRAFT_POOL`, default on; "0" turns it off).
    pub pool: bool,
    /// How long a request waits for an unreachable broker (`GRAFT_WAIT_MS`).
    pub wait_ms: u32,
    /// The egress endpoint every IPv4 (`[0]`) / IPv6 (`[1]`) destination
    /// goes to, when the rules have one, with the pool on: new TCP sockets
    /// of that family may then be grafted as they are made
    /// ([`crate::early`]).
    pub catch_all: [Option<graft_core::EndpointName>; 2],
}

impl Config {
    /// Builds the configuration from an environment lookup.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Config {
        let mut bad = None;
        let mut parse_one = |var: &str, which: usize| -> RuleSet {
            let v = get(var);
            let v = v.as_deref();
            let r: Result<RuleSet, RuleError> = match which {
                0 => RuleSet::from_env_values(v, None, None),
                1 => RuleSet::from_env_values(None, v, None),
                _ => RuleSet::from_env_values(None, None, v),
            };
            r.unwrap_or_else(|e| {
                if bad.is_none() {
                    bad = Some(format!(
                        "bad mapping in {var}: {e}: fix the rule (graft -i ADDR:PORT[-PORT]=EP, \
                         -e PREFIX/LEN=EP, -x PREFIX/LEN); every IPv4/IPv6 bind and connect \
                         fails with EINVAL until then"
                    ));
                }
                RuleSet::default()
            })
        };
        let ing = parse_one(ENV_INGRESS, 0);
        let egr = parse_one(ENV_EGRESS, 1);
        let exc = parse_one(ENV_EGRESS_EXCLUDE, 2);
        let mut rules = ing;
        rules.egress = egr.egress;
        rules.egress.extend(exc.egress);
        let getsockname_app = match get(ENV_GETSOCKNAME).as_deref() {
            None | Some("") | Some("host") => false,
            Some("app") => true,
            Some(other) => {
                if bad.is_none() {
                    bad = Some(format!(
                        "bad {ENV_GETSOCKNAME}=\"{other}\": expected \"host\" or \"app\"; \
                         every IPv4/IPv6 bind and connect fails with EINVAL until then"
                    ));
                }
                false
            }
        };
        let broker = get(ENV_BROKER)
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| DEFAULT_BROKER_NAME.to_owned());
        if let (Err(why), None) = (graft_core::check_broker_name(&broker), &bad) {
            bad = Some(format!("bad {ENV_BROKER}: \"{broker}\": {why}"));
        }
        let verbose = matches!(get(ENV_VERBOSE).as_deref(), Some(v) if !v.is_empty() && v != "0");
        let pool = get(ENV_POOL).as_deref() != Some("0");
        let wait_ms = match get(ENV_WAIT).as_deref() {
            None | Some("") => DEFAULT_WAIT_MS,
            Some(v) => match v.parse::<u32>() {
                Ok(ms) if ms <= MAX_WAIT_MS => ms,
                _ => {
                    if bad.is_none() {
                        bad = Some(format!(
                            "bad {ENV_WAIT}=\"{v}\": expected milliseconds from 0 to {MAX_WAIT_MS}; \
                             every IPv4/IPv6 bind and connect fails with EINVAL until then"
                        ));
                    }
                    DEFAULT_WAIT_MS
                }
            },
        };
        let catch_all = if pool && bad.is_none() {
            [rules.egress_catch_all(false), rules.egress_catch_all(true)]
        } else {
            [None, None]
        };
        Config {
            rules,
            bad,
            verbose,
            getsockname_app,
            broker,
            pool,
            wait_ms,
            catch_all,
        }
    }

    /// Whether the library has anything to do at all.
    pub fn active(&self) -> bool {
        self.bad.is_some() || !self.rules.is_empty()
    }
}

static CONFIG: AtomicPtr<Config> = AtomicPtr::new(std::ptr::null_mut());
static ACTIVE: AtomicBool = AtomicBool::new(false);
static GSN_APP: AtomicBool = AtomicBool::new(false);

/// Reads the environment and publishes the configuration (constructor only).
pub fn init() {
    let cfg = Config::from_lookup(|k| std::env::var(k).ok());
    let active = cfg.active();
    let app = cfg.getsockname_app;
    crate::broker::set_wait_ms(cfg.wait_ms);
    // Leaked on purpose: interposed calls may run until the very end of the
    // process (atexit handlers, other destructors), so it must never be freed.
    let p = Box::into_raw(Box::new(cfg));
    CONFIG.store(p, Ordering::Release);
    GSN_APP.store(app, Ordering::Relaxed);
    ACTIVE.store(active, Ordering::Release);
}

/// Whether any rule (or a configuration error) exists: one relaxed load.
#[inline(always)]
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

#[inline(always)]
pub fn getsockname_app() -> bool {
    GSN_APP.load(Ordering::Relaxed)
}

pub fn get() -> Option<&'static Config> {
    let p = CONFIG.load(Ordering::Acquire);
    // SAFETY: a non-null pointer came from Box::into_raw in `init` and is never
    // freed, so it is valid for the rest of the process.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Config {
        let owned: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn empty_environment_is_inactive() {
        let c = cfg(&[]);
        assert!(!c.active());
        assert_eq!(c.broker, "graft/broker");
        assert!(!c.verbose && !c.getsockname_app);
    }

    #[test]
    fn rules_from_all_three_variables() {
        let c = cfg(&[
            ("GRAFT_INGRESS_CONVERT", "0.0.0.0:0-65535=ep-in4"),
            ("GRAFT_EGRESS_CONVERT", "0.0.0.0/0=ep-out4"),
            ("GRAFT_EGRESS_EXCLUDE", "127.0.0.0/8"),
            ("GRAFT_VERBOSE", "1"),
            ("GRAFT_GETSOCKNAME", "app"),
            ("GRAFT_BROKER", "t/b"),
        ]);
        assert!(c.active() && c.bad.is_none() && c.verbose && c.getsockname_app);
        assert_eq!(c.rules.ingress.len(), 1);
        assert_eq!(c.rules.egress.len(), 2);
        assert_eq!(c.broker, "t/b");
    }

    #[test]
    fn bad_rule_names_variable_and_fix() {
        let c = cfg(&[("GRAFT_EGRESS_CONVERT", "10.0.0.1/8=x")]);
        assert!(c.active());
        assert_eq!(
            c.bad.as_deref(),
            Some(
                "bad mapping in GRAFT_EGRESS_CONVERT: \"10.0.0.1/8=x\": address has bits set \
                 beyond the prefix length: fix the rule (graft -i ADDR:PORT[-PORT]=EP, \
                 -e PREFIX/LEN=EP, -x PREFIX/LEN); every IPv4/IPv6 bind and connect fails \
                 with EINVAL until then"
            )
        );
        let c = cfg(&[("GRAFT_WAIT_MS", "soon")]);
        assert!(c.bad.unwrap().starts_with("bad GRAFT_WAIT_MS=\"soon\""));
        assert_eq!(cfg(&[("GRAFT_WAIT_MS", "0")]).wait_ms, 0);
        assert_eq!(cfg(&[]).wait_ms, 1000);
        let c = cfg(&[("GRAFT_GETSOCKNAME", "guest")]);
        assert!(c
            .bad
            .unwrap()
            .starts_with("bad GRAFT_GETSOCKNAME=\"guest\""));
    }
}
