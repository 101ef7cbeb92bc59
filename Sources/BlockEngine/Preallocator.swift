import Dispatch
import Synchronization

/// Reserves host space ahead of an append-only allocator, on a background queue, so the
/// host file system's block/page allocation for new clusters happens off the write path
/// (QEMU's `preallocate` filter does the same on request; here it is always on).
///
/// The reservation uses FALLOC_FL_KEEP_SIZE: the file's size, which formats read as the
/// end of the image, never moves, and a crash leaves only unused blocks past the end.
/// `release()` gives them back on close. A file system without fallocate switches it off.
public final class Preallocator: Sendable {
    let file: ImageFile
    /// How far past the allocation frontier to keep reserved, and the step it grows by.
    let ahead: UInt64
    let step: UInt64
    private struct State {
        var reservedEnd: UInt64 = 0
        var target: UInt64 = 0
        var queued = false
        var off = false
    }
    private let state = Mutex(State())
    private let queue = DispatchQueue(label: "rawmount.preallocate")

    public init(file: ImageFile, ahead: UInt64 = 32 << 20, step: UInt64 = 1 << 20) {
        self.file = file
        self.ahead = ahead
        self.step = step
    }

    /// The allocator has handed out space up to `end`; keep `ahead` bytes past it reserved.
    public func reached(_ end: UInt64) {
        let schedule: Bool = state.withLock { s in
            guard !s.off else { return false }
            s.target = max(s.target, end + ahead)
            // Only wake the worker once the frontier is within `ahead - step` of the reserve.
            guard !s.queued, end + ahead - step > s.reservedEnd else { return false }
            s.queued = true
            return true
        }
        if schedule { queue.async { self.work() } }
    }

    private func work() {
        while true {
            let range: (UInt64, UInt64)? = state.withLock { s in
                let from = max(s.reservedEnd, (s.target - ahead).alignedDown(4096))
                guard !s.off, from < s.target else { s.queued = false; return nil }
                return (from, min(s.target - from, step))
            }
            guard let (from, length) = range else { return }
            let ok = (try? file.fallocate(mode: ImageFile.fallocKeepSize, offset: from, length: length)) ?? false
            state.withLock { s in
                if ok { s.reservedEnd = max(s.reservedEnd, from + length) } else { s.off = true }
            }
        }
    }

    /// Waits until queued reservation work is done.
    func settle() { queue.sync {} }

    /// Stops reserving and returns the unused reservation past the file's end to the host.
    public func release() {
        state.withLock { $0.off = true }
        queue.sync {}
        let reserved = state.withLock { $0.reservedEnd }
        guard let size = try? file.size(), reserved > size else { return }
        // A same-size truncate drops blocks past the end on ext4 and tmpfs; ext4 ignores a
        // punch past the end, other file systems need it.
        try? file.truncate(to: size)
        _ = try? file.punchHole(offset: size, length: reserved - size)
    }
}
