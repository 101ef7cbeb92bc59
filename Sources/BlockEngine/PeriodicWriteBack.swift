import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Bounds how long an acknowledged change lives only in this process: at most `interval`
/// after a disk last changed, whatever its writers do next, held writes are applied and
/// the dirty tables written back in the format's order (`BlockDevice.writeBack`). A server
/// killed with -9 then loses only what was acknowledged in the last moment, as QEMU's
/// drivers (which write tables at once) do; a disk that keeps changing is written back once
/// per interval, not once per write. One loop serves a FUSE mount's files and an nbdkit
/// export alike.
public final class PeriodicWriteBack: Sendable {
    /// Seconds; RAWMOUNT_WRITEBACK_SECONDS changes it (0 turns the write-back off, as the
    /// benchmark does to measure what it costs).
    public static let interval: Double = getenv("RAWMOUNT_WRITEBACK_SECONDS").flatMap { Double(String(cString: $0)) } ?? 1.0

    /// One disk the loop watches.
    public struct Target: Sendable {
        let name: String
        /// A count that moves whenever the disk changed (completed writes and zeroings).
        let changes: @Sendable () -> UInt64
        /// Applies what the front end holds before the write-back (a FUSE mount's
        /// write-behind queue); its failures stay for the writer's next request to report.
        let drain: (@Sendable () -> Void)?
        let device: BlockDevice
        public init(name: String, device: BlockDevice, changes: @escaping @Sendable () -> UInt64,
                    drain: (@Sendable () -> Void)? = nil) {
            self.name = name; self.device = device; self.changes = changes; self.drain = drain
        }
    }

    private let targets: [Target]
    private let onError: @Sendable (String, any Error) -> Void
    private let stopped = Atomic<Bool>(false)
    private let done = Mutex<Bool>(false)
    private let semaphore = DispatchSemaphore(value: 0)

    /// Starts the loop over the writable targets (none, or an interval of 0: no thread).
    /// `onError` hears a failed write-back (fsync, flush and unmount report it to the user).
    public init(_ targets: [Target], onError: @escaping @Sendable (_ name: String, _ error: any Error) -> Void) {
        self.targets = Self.interval > 0 ? targets.filter { $0.device.isWritable } : []
        self.onError = onError
        guard !self.targets.isEmpty else { return }
        let written = self.targets.map { $0.changes() }
        // A queue of its own: the loop sleeps on the semaphore most of the time.
        DispatchQueue(label: "rawmount.periodic-write-back").async { [self] in run(written) }
    }

    private func run(_ start: [UInt64]) {
        var written = start
        while !stopped.load(ordering: .relaxed) {
            _ = semaphore.wait(timeout: .now() + Self.interval)
            for (i, t) in targets.enumerated() {
                let now = t.changes()
                guard now != written[i] else { continue }
                t.drain?()
                do { try t.device.writeBack() } catch { onError(t.name, error) }
                written[i] = now
            }
        }
        done.withLock { $0 = true }
    }

    /// Stops the thread and waits until its last write-back is done (before the images close).
    public func stop() {
        guard !targets.isEmpty else { return }
        stopped.store(true, ordering: .relaxed)
        semaphore.signal()
        while !done.withLock({ $0 }) { usleep(1000) }
    }
}
