//! Requests to graftd on behalf of a pod: the same control socket and client
//! as `ip graft` (iproute-graft's library), with the pod's namespace as the
//! caller's descriptor, since graft-cni itself runs in the host namespace.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use graft_core::nsrules::NsRules;
use graft_core::proto::control::{EndpointInfo, Request};
use graft_core::{EndpointName, EndpointSpec, NetnsId};
use iproute_graft::client::{self, ClientError};
use iproute_graft::netns;

use crate::cni::{code, CniError};
use crate::config::strip_error;

/// A pod namespace, opened.
pub struct PodNs {
    pub fd: OwnedFd,
    pub id: NetnsId,
}

/// Opens the namespace at `path` (CNI_NETNS).
pub fn open_ns(path: &str) -> Result<PodNs, CniError> {
    let spec = if path.contains('/') {
        path.to_owned()
    } else {
        format!("./{path}")
    };
    let fd = netns::open(&spec).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS: {}", strip_error(&e.to_string())),
        )
    })?;
    let id = NetnsId::of_fd(fd.as_fd()).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {path}: cannot stat: {e}"),
        )
    })?;
    Ok(PodNs { fd, id })
}

/// graftd's refusals keep its words; an unreachable graftd is worth a retry.
pub fn cni_error(what: &str, e: ClientError) -> CniError {
    let text = strip_error(&e.to_string()).to_owned();
    let c = match e {
        ClientError::Graftd { .. } => code::GRAFTD_REFUSED,
        _ => code::TRY_AGAIN_LATER,
    };
    CniError::new(c, format!("{what}: {text}"))
}

/// Whether graftd was simply not there.
pub fn unreachable(e: &ClientError) -> bool {
    !matches!(e, ClientError::Graftd { .. })
}

pub fn add(control: &Path, pod: &PodNs, spec: &EndpointSpec) -> Result<(), CniError> {
    let what = format!("adding endpoint {}", spec.name);
    let target = match &spec.netns {
        Some(t) => Some(netns::open(t).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("{what}: {}", strip_error(&e.to_string())),
            )
        })?),
        None => None,
    };
    let mut fds = vec![pod.fd.as_fd()];
    fds.extend(target.as_ref().map(|t| t.as_fd()));
    let req = Request::Add {
        endpoint: spec.clone(),
        target_fd: target.is_some(),
    };
    client::call(control, &req, &fds)
        .map(|_| ())
        .map_err(|e| cni_error(&what, e))
}

pub fn del(control: &Path, pod: &PodNs, name: EndpointName) -> Result<(), ClientError> {
    client::call(control, &Request::Del { name }, &[pod.fd.as_fd()]).map(|_| ())
}

pub fn set_rules(control: &Path, pod: &PodNs, rules: &NsRules) -> Result<(), ClientError> {
    let req = Request::SetRules {
        rules: rules.clone(),
    };
    client::call(control, &req, &[pod.fd.as_fd()]).map(|_| ())
}

pub fn get_rules(control: &Path, pod: &PodNs) -> Result<NsRules, ClientError> {
    let a = client::call(control, &Request::GetRules {}, &[pod.fd.as_fd()])?;
    Ok(a.rules.unwrap_or_default())
}

pub fn show(control: &Path, pod: &PodNs) -> Result<Vec<EndpointInfo>, ClientError> {
    Ok(client::call(control, &Request::Show {}, &[pod.fd.as_fd()])?.endpoints)
}

/// Whether graftd answers (STATUS).
pub fn ping(control: &Path) -> Result<(), ClientError> {
    let me = netns::open_self().map_err(|e| ClientError::Io {
        op: "open(/proc/self/ns/net)",
        errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    client::call(control, &Request::Ping {}, &[me.as_fd()]).map(|_| ())
}
