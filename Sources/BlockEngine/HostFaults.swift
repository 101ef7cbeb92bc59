#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// Tests only: makes the host fail one of the image's writes, syncs or fallocates (counted
/// across all threads of the process, which strace's per-thread `when=` cannot do), as a
/// full or dying disk would. Off unless RAWMOUNT_TEST_FAULT is set, then one atomic load
/// per host operation.
///
/// RAWMOUNT_TEST_FAULT=`OPS:N:KIND[:from]`
/// - OPS: `write`, `sync`, `fallocate` (fallocate and ftruncate), comma-separated, or `all`;
/// - N: the operation (of those kinds, on files opened for writing) that fails, from 1 (0:
///   none, only count them);
/// - KIND: `eio`, `enospc`, or `short` (the bytes up to the last 4 KiB boundary of the file
///   before the write's middle land, then ENOSPC: a file system that ran out of blocks), or
///   `kill` (the process is killed with SIGKILL instead of doing the operation: a crash at
///   exactly that point);
/// - `from`: every later operation of those kinds fails too (a disk that stays full or dead).
/// RAWMOUNT_TEST_FAULT_REPORT=FILE gets one line when the first fault fires, so a campaign
/// knows its fault was reached, and `ops write=A sync=B fallocate=C` when the process exits.
public enum HostFaults {
    public enum Operation: String, Sendable { case write, sync, fallocate }

    struct Plan: Sendable {
        var operations: Set<String>
        var n: Int
        var errno: Int32
        var short: Bool
        var from: Bool
        var report: String?
        var kill: Bool
    }

    static let plan: Plan? = {
        guard let spec = getenv("RAWMOUNT_TEST_FAULT").map({ String(cString: $0) }) else { return nil }
        let parts = spec.split(separator: ":").map(String.init)
        guard parts.count >= 3, let n = Int(parts[1]), n >= 0 else { return nil }
        let ops = parts[0] == "all" ? ["write", "sync", "fallocate"] : parts[0].split(separator: ",").map(String.init)
        let kind = parts[2]
        return Plan(operations: Set(ops), n: n, errno: kind == "eio" ? EIO : ENOSPC, short: kind == "short",
                    from: parts.count > 3 && parts[3] == "from",
                    report: getenv("RAWMOUNT_TEST_FAULT_REPORT").map { String(cString: $0) }, kill: kind == "kill")
    }()

    static let enabled = plan != nil
    static let counter = Atomic<Int>(0)
    /// Every operation by kind (write, sync, fallocate), for the exit report.
    static let writes = Atomic<Int>(0), syncs = Atomic<Int>(0), fallocates = Atomic<Int>(0)
    static let fired = Atomic<Bool>(false)
    static let registered = Atomic<Bool>(false)

    /// What the next host operation of kind `op` on `file` must do: nil (go on), or the
    /// errno to fail with and whether half of a write goes through first.
    @inline(__always)
    static func check(_ op: Operation, _ file: String) -> (errno: Int32, short: Bool)? {
        guard enabled, let plan else { return nil }
        let seen: Int
        switch op {
        case .write: seen = writes.add(1, ordering: .relaxed).newValue
        case .sync: seen = syncs.add(1, ordering: .relaxed).newValue
        case .fallocate: seen = fallocates.add(1, ordering: .relaxed).newValue
        }
        if seen == 1 && registered.exchange(true, ordering: .relaxed) == false && plan.report != nil {
            atexit {
                HostFaults.appendReport("ops write=\(HostFaults.writes.load(ordering: .relaxed)) sync=\(HostFaults.syncs.load(ordering: .relaxed)) fallocate=\(HostFaults.fallocates.load(ordering: .relaxed))\n")
            }
        }
        guard plan.operations.contains(op.rawValue) else { return nil }
        let k = counter.add(1, ordering: .sequentiallyConsistent).newValue
        guard plan.n > 0, k == plan.n || (plan.from && k > plan.n) else { return nil }
        if plan.kill {
            appendReport("test fault: killed before \(op.rawValue) #\(k) of \(file)\n")
            Glibc.kill(getpid(), SIGKILL)
        }
        if !fired.exchange(true, ordering: .sequentiallyConsistent) {
            appendReport("test fault: \(op.rawValue) #\(k) of \(file) fails (\(String(cString: strerror(plan.errno)))\(plan.short && op == .write ? ", after half of it" : ""))\n")
        }
        return (plan.errno, plan.short && op == .write)
    }

    /// The same test point for host writes made outside `ImageFile` (a manifest, a rename):
    /// throws the planned error, or kills the process, when this is the planned operation.
    public static func point(_ op: Operation, _ file: String) throws {
        if enabled, let (err, _) = check(op, file) { throw BlockError.io(file: file, operation: op.rawValue, offset: nil, errno: err) }
    }

    static func appendReport(_ line: String) {
        guard let report = plan?.report else { return }
        let fd = open(report, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0o644)
        if fd >= 0 { _ = line.withCString { write(fd, $0, strlen($0)) }; close(fd) }
    }
}
