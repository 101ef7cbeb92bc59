import BlockEngine
import Synchronization

/// How a writer changes the VHDX headers, as the specification and QEMU do it: the
/// non-current header gets the next sequence number, this session's file-write GUID and
/// the change, is written and made durable, and becomes current; then the same again, so
/// both copies hold the change. A torn write leaves the other header current.
final class VHDXHeaderUpdate: Sendable {
    private struct State {
        var current: Int
        var bytes: [UInt8]
        var dataWritten = false
    }
    private let state: Mutex<State>
    /// One update at a time (a guest's first write and a table write-back may both update):
    /// each reads the current header and writes the other slot. Held across the writes;
    /// nothing that maps guest data takes it.
    private let updating = Mutex<Void>(())
    private let file: ImageFile
    /// A new file-write GUID for this session's first header write (the specification asks
    /// for one before any write to the file).
    private let session = VHDXGUID(bytes: randomGUID())

    init(file: ImageFile, header: VHDXHeader) {
        self.file = file
        state = Mutex(State(current: header.current, bytes: header.raw))
    }

    var logGUID: VHDXGUID { state.withLock { VHDXGUID(bytes: Array($0.bytes[48..<64])) } }

    /// Writes both headers with `logGUID` (nil: unchanged) and, when asked, a new
    /// data-write GUID (before the first change a reader of the disk could see).
    func update(logGUID: VHDXGUID? = nil, newDataWriteGUID: Bool = false) throws {
        let dataGUID = newDataWriteGUID ? randomGUID() : nil
        try updating.withLock { _ in try writeBoth(dataGUID: dataGUID, logGUID: logGUID) }
    }

    private func writeBoth(dataGUID: [UInt8]?, logGUID: VHDXGUID?) throws {
        for _ in 0..<2 {
            let (slot, next) = state.withLock { s -> (Int, [UInt8]) in
                var b = s.bytes
                let seq = le64(b, 8) &+ 1
                for i in 0..<8 { b[8 + i] = UInt8(truncatingIfNeeded: seq >> (8 * UInt64(i))) }
                b.replaceSubrange(16..<32, with: session.bytes)
                if let dataGUID { b.replaceSubrange(32..<48, with: dataGUID) }
                if let logGUID { b.replaceSubrange(48..<64, with: logGUID.bytes) }
                let c = crc32c(b, zeroing: 4)
                for i in 0..<4 { b[4 + i] = UInt8(truncatingIfNeeded: c >> (8 * UInt32(i))) }
                return (1 - s.current, b)
            }
            try file.write(next, at: VHDXHeader.headerOffsets[slot])
            try file.sync()
            state.withLock { s in s.current = slot; s.bytes = next }
        }
    }

    /// Before the first guest-visible write of the session: a new data-write GUID.
    func willWriteData() throws {
        guard state.withLock({ s -> Bool in defer { s.dataWritten = true }; return !s.dataWritten }) else { return }
        do { try update(newDataWriteGUID: true) } catch {
            state.withLock { $0.dataWritten = false }
            throw error
        }
    }
}
