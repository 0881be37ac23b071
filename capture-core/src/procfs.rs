//! What `/proc/PID/stat` says about a process.

/// The fields after "pid (comm) ", split on spaces (comm may contain
/// spaces and parentheses, so the split starts at the last ')').
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    stat_fields_at(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

fn stat_fields_at(path: &std::path::Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    parse_after_comm(&stat)
}

fn state_at(path: &std::path::Path) -> Option<char> {
    stat_fields_at(path)?.first()?.chars().next()
}

fn parse_after_comm(stat: &str) -> Option<Vec<String>> {
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// The state letter (`T` = stopped), `None` if the process is gone.
/// `/proc/PID/stat` gives the thread-group leader's, and a leader that
/// exited on its own (`pthread_exit()` from `main()`) stays a zombie while
/// the other threads run on: then the threads' states say whether the
/// process is stopped ([`group_state`]).
pub fn state(pid: u32) -> Option<char> {
    let leader = state_at(std::path::Path::new(&format!("/proc/{pid}/stat")))?;
    if leader != 'Z' {
        return Some(leader);
    }
    let threads: Vec<char> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| state_at(&t.path().join("stat")))
                .collect()
        })
        .unwrap_or_default();
    Some(group_state(leader, &threads))
}

/// A process's state from its leader's and its threads' (the leader's
/// among them or not): the leader's, unless the leader is a zombie and
/// some thread is not (a zombie `Z` or dead `X`), whose state is the
/// process's then.
fn group_state(leader: char, threads: &[char]) -> char {
    if leader != 'Z' {
        return leader;
    }
    threads
        .iter()
        .copied()
        .find(|s| !matches!(s, 'Z' | 'X'))
        .unwrap_or(leader)
}

/// When the process started, in clock ticks (`USER_HZ`) since boot: field
/// 22 of `/proc/PID/stat`, which the kernel derives from the thread
/// group leader's `start_boottime`. With the pid it names one process for
/// the life of the machine, since a pid is reused only by a later process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    // Field 22 counted from 1, where field 3 (the state) is index 0 here.
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_after_a_comm_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10";
        let f = parse_after_comm(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[22 - 3], "12345");
    }

    #[test]
    fn a_zombie_leader_takes_the_state_of_a_live_thread() {
        assert_eq!(group_state('S', &['S', 'T']), 'S', "a live leader's own");
        assert_eq!(group_state('Z', &['Z', 'T', 'S']), 'T');
        assert_eq!(group_state('Z', &['Z', 'X', 'S']), 'S');
        assert_eq!(group_state('Z', &['Z']), 'Z', "every thread gone");
        assert_eq!(group_state('Z', &[]), 'Z');
    }

    #[test]
    fn this_process_is_running_and_started_after_boot() {
        let me = std::process::id();
        assert!(matches!(state(me), Some('R' | 'S')));
        let ticks = start_ticks(me).unwrap();
        assert!(ticks > 0);
        assert_eq!(start_ticks(me), Some(ticks));
    }
}
