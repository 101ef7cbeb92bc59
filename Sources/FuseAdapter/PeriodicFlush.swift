import BlockEngine
import Dispatch
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Bounds how long an acknowledged write lives only in this process: at most `interval`
/// after the disk last changed, whatever the writer does next, the held writes are applied
/// and the dirty tables written back in the format's order (`BlockDevice.flush`). A server
/// killed with -9 then loses only what was acknowledged in the last moment, as QEMU's
/// drivers (which write tables at once) do; a disk that keeps changing is flushed once per
/// interval, not once per write.
public final class PeriodicFlush: Sendable {
    /// Seconds; RAWMOUNT_WRITEBACK_SECONDS changes it (0 turns the write-back off, as the
    /// benchmark does to measure what it costs).
    public static let interval: Double = getenv("RAWMOUNT_WRITEBACK_SECONDS").flatMap { Double(String(cString: $0)) } ?? 1.0
    private let files: [ExposedFile]
    private let log: ServerLog?
    private let stopped = Atomic<Bool>(false)
    private let done = Mutex<Bool>(false)
    private let wake = WakeUp()

    public init(files: [ExposedFile], log: ServerLog?) {
        self.files = Self.interval > 0 ? files.filter { !$0.readOnly } : []
        self.log = log
        guard !self.files.isEmpty else { return }
        let thread = Thread { [self] in run() }
        thread.start()
    }

    private func run() {
        var flushedAt: [Int] = files.map { _ in 0 }
        while !stopped.load(ordering: .relaxed) {
            wake.wait(seconds: Self.interval)
            for (i, f) in files.enumerated() {
                let changed = f.completedChanges
                guard changed != flushedAt[i] else { continue }
                do {
                    f.writeBehind?.drain()  // a failure stays for the writer's next request to report
                    try f.device.writeBack()
                    flushedAt[i] = changed
                } catch {
                    // fsync, flush and unmount report it to the user; here it is only logged.
                    log?.record("periodic write-back of \(f.name): \(error)")
                    flushedAt[i] = changed
                }
            }
        }
        done.withLock { $0 = true }
    }

    /// Stops the thread and waits until its last write-back is done (before the images close).
    public func stop() {
        guard !files.isEmpty else { return }
        stopped.store(true, ordering: .relaxed)
        wake.signal()
        while !done.withLock({ $0 }) { usleep(1000) }
    }
}

/// A sleep that `signal` ends early.
final class WakeUp: Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    func wait(seconds: Double) { _ = semaphore.wait(timeout: .now() + seconds) }
    func signal() { semaphore.signal() }
}
