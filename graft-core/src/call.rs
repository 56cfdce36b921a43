//! The socket calls graft intercepts, whichever way it intercepts them: the
//! preload library interposes the libc functions, the seccomp supervisor
//! traps the system calls. One definition so that both name a call, and fail
//! it, the same way.

/// An intercepted call that can carry an address graft cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Bind,
    /// Rare, and the only moment a server that bound port 0 (or nothing) is
    /// known to be one.
    Listen,
    Connect,
    Sendto,
    Sendmsg,
    Sendmmsg,
}

impl Call {
    /// Every call, in the order the seccomp filter tests them (`sendto`
    /// last: only it needs its arguments looked at).
    pub const ALL: [Call; 6] = [
        Call::Bind,
        Call::Connect,
        Call::Sendmsg,
        Call::Sendmmsg,
        Call::Listen,
        Call::Sendto,
    ];

    /// The system call number on the target the crate is built for.
    pub const fn nr(self) -> i64 {
        match self {
            Call::Bind => libc::SYS_bind,
            Call::Listen => libc::SYS_listen,
            Call::Connect => libc::SYS_connect,
            Call::Sendto => libc::SYS_sendto,
            Call::Sendmsg => libc::SYS_sendmsg,
            Call::Sendmmsg => libc::SYS_sendmmsg,
        }
    }

    /// The call a system call number `nr` stands for, if graft traps it.
    pub fn of_nr(nr: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.nr() == nr)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Call::Bind => "bind",
            Call::Listen => "listen",
            Call::Connect => "connect",
            Call::Sendto => "sendto",
            Call::Sendmsg => "sendmsg",
            Call::Sendmmsg => "sendmmsg",
        }
    }

    /// The errno when the endpoint cannot be had at all: a server cannot
    /// get its address, a client cannot reach its destination.
    pub const fn unreachable_errno(self) -> libc::c_int {
        match self {
            Call::Bind | Call::Listen => libc::EADDRNOTAVAIL,
            Call::Connect | Call::Sendto | Call::Sendmsg | Call::Sendmmsg => libc::ENETUNREACH,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Call;

    #[test]
    fn numbers_map_back() {
        for c in Call::ALL {
            assert_eq!(Call::of_nr(c.nr()), Some(c), "{}", c.name());
        }
        assert_eq!(Call::of_nr(libc::SYS_read), None);
    }
}
