//! `graft-cni`: a chained CNI plugin that gives a pod graft endpoints on its
//! node.
//!
//! A container runtime runs it with `CNI_COMMAND` (ADD, DEL, CHECK, VERSION,
//! STATUS, GC), `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and the network
//! configuration on stdin (spec versions 0.4.0, 1.0.0 and 1.1.0). ADD
//! registers the config's endpoints (the fields of `ip graft add`) and the
//! `portMappings` capability's mappings as endpoints in the pod's network
//! namespace with the node's graftd, over the control socket `ip graft` uses,
//! and gives graftd the namespace's rules (`ingress`, `egress`, `exclude`,
//! and one ingress rule per mapped container port), which `graft -- CMD`
//! inside the pod then fetches. It adds no interface: chained, it passes the
//! previous result on unchanged. Every failure is CNI error JSON on stdout
//! and exit status 1.
//!
//! `graft-cni conflist NETD_DIR OUT_NAME` (no CNI_COMMAND) writes a conflist
//! chaining graft-cni after the cluster's plugin, for the DaemonSet's init
//! container (see [`conflist`]).
#![forbid(unsafe_code)]

mod cni;
mod config;
mod conflist;
mod graftd;
mod ops;
mod record;

use std::io::{Read, Write};
use std::process::ExitCode;

use cni::{code, CniError};
use serde_json::Value;

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// Runs one command; `Ok(None)` prints nothing.
fn run(cmd: &str, stdin: &[u8], env: &ops::CniEnv) -> Result<Option<Value>, (CniError, String)> {
    if cmd == "VERSION" {
        return Ok(Some(cni::version_info()));
    }
    let fallback = cni::CURRENT.to_owned();
    let conf = config::parse(stdin).map_err(|e| (e, fallback.clone()))?;
    let v = conf.cni_version.clone();
    let with_v = |e: CniError| (e, v.clone());
    cni::check_version(&v).map_err(|e| (e, fallback))?;
    match cmd {
        "ADD" => ops::add(&conf, env).map(Some).map_err(with_v),
        "DEL" => ops::del(&conf, env).map(|()| None).map_err(with_v),
        "CHECK" => ops::check(&conf, env).map(|()| None).map_err(with_v),
        "STATUS" => ops::status(&conf).map(|()| None).map_err(with_v),
        "GC" => ops::gc(&conf).map(|()| None).map_err(with_v),
        other => Err(with_v(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND \"{other}\" is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
        ))),
    }
}

fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    // Nothing useful is left to do when stdout is gone.
    let _ = serde_json::to_writer(&mut out, v);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// The node-setup mode: `graft-cni conflist NETD_DIR OUT_NAME`.
fn conflist_main(args: &[String]) -> ExitCode {
    let [netd, out] = args else {
        eprintln!("usage: graft-cni conflist NETD_DIR OUT_NAME");
        return ExitCode::from(2);
    };
    if out.contains('/') || out.is_empty() {
        eprintln!("graft-cni: OUT_NAME \"{out}\" must be a file name");
        return ExitCode::from(2);
    }
    match conflist::write(std::path::Path::new(netd), out, &var) {
        Ok(line) => {
            println!("graft-cni: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("graft-cni: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if var("CNI_COMMAND").is_none() && args.first().is_some_and(|a| a == "conflist") {
        return conflist_main(&args[1..]);
    }
    let Some(cmd) = var("CNI_COMMAND").filter(|c| !c.is_empty()) else {
        eprintln!("graft-cni: a CNI plugin; run by a container runtime with CNI_COMMAND set (ADD, DEL, CHECK, VERSION, STATUS, GC) and the network configuration on stdin");
        emit(&CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set").to_json(cni::CURRENT));
        return ExitCode::from(1);
    };
    let mut stdin = Vec::new();
    // Bounded: a network configuration is small.
    if let Err(e) = std::io::stdin().take(4 << 20).read_to_end(&mut stdin) {
        emit(
            &CniError::new(code::IO, format!("cannot read the configuration: {e}"))
                .to_json(cni::CURRENT),
        );
        return ExitCode::from(1);
    }
    let env = ops::CniEnv {
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
    };
    match run(&cmd, &stdin, &env) {
        Ok(Some(v)) => {
            emit(&v);
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((e, version)) => {
            emit(&e.to_json(&version));
            ExitCode::from(1)
        }
    }
}
