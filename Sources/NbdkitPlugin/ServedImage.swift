import BlockEngine
import ImageFormats
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The one image nbdkit serves: configured by `key=value` parameters, opened once after
/// nbdkit has forked (threads started before a fork would not exist in the server), shared by
/// every connection, so a flush on one covers all (multi-conn), and closed when nbdkit stops.
final class ServedImage: Sendable {
    struct Settings: Sendable {
        var image: String?
        var format: ImageFormat?
        var readOnly = false
        var snapshot: String?
        var forceShare = false
        /// Created once the image is open (`rawmount serve` waits for it: nbdkit writes its
        /// pid file before the plugin opens the image, so that alone would announce a server
        /// that may still fail).
        var readyFile: String?
    }

    let settings = Mutex(Settings())
    private let opened = Mutex<BlockDevice?>(nil)
    private let writeBack = Mutex<PeriodicWriteBack?>(nil)

    var device: BlockDevice? { opened.withLock { $0 } }

    func configure(_ key: String, _ value: String) throws {
        try settings.withLock { s in
            switch key {
            case "image", "file": s.image = value
            case "format":
                guard let f = ImageFormat(rawValue: value.lowercased()) else {
                    throw BlockError.usage("format=\(value): known formats are \(ImageFormat.allCases.map(\.rawValue).joined(separator: ", "))")
                }
                s.format = f
            case "readonly", "read-only": s.readOnly = try Self.bool(key, value)
            case "snapshot": s.snapshot = value
            case "force-share", "shared": s.forceShare = try Self.bool(key, value)
            case "ready-file": s.readyFile = value
            default: throw BlockError.usage("unknown parameter \(key)=\(value) (image=, format=, readonly=, snapshot=, force-share=)")
            }
        }
    }

    static func bool(_ key: String, _ value: String) throws -> Bool {
        switch value.lowercased() {
        case "1", "true", "yes", "on": return true
        case "0", "false", "no", "off": return false
        default: throw BlockError.usage("\(key)=\(value): true or false")
        }
    }

    func checkComplete() throws {
        let s = settings.withLock { $0 }
        guard s.image != nil else { throw BlockError.usage("no image given (image=FILE, or the file name as the first parameter)") }
        if s.forceShare && !s.readOnly { throw BlockError.usage("force-share=true needs readonly=true: a writer must hold the image's locks") }
    }

    /// Opens the image (writable unless read-only was asked or the format cannot be written)
    /// and starts the periodic write-back a FUSE mount also has.
    func open() throws {
        let s = settings.withLock { $0 }
        guard let image = s.image else { throw BlockError.usage("no image given") }
        let writable = !s.readOnly && s.snapshot == nil
        let device = try ImageOpener.open(path: image, options: .init(
            writable: writable, format: s.format, lock: !s.forceShare, snapshot: s.snapshot,
            onNote: { note in Log.debug(note) }))
        opened.withLock { $0 = device }
        if device.isWritable { startWriteBack(device) }
        if let ready = s.readyFile {
            let fd = Glibc.open(ready, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
            if fd >= 0 { Glibc.close(fd) }
        }
    }

    /// At most a second after the disk last changed, tables are written back in the format's
    /// order (as `rawmount mount` does), so nbdkit killed with -9 leaves the image as a killed
    /// mount would: consistent, missing at most the last moment's writes.
    private func startWriteBack(_ device: BlockDevice) {
        let loop = PeriodicWriteBack([.init(name: device.driver.file.path, device: device, changes: { device.changeCount })],
                                     onError: { name, error in Log.error("periodic write-back of \(name): \(error)") })
        writeBack.withLock { $0 = loop }
    }

    /// Flushes and closes, as unmount does; nbdkit calls this once every connection is gone.
    func close() {
        writeBack.withLock { $0 }?.stop()
        guard let device = opened.withLock({ d -> BlockDevice? in defer { d = nil }; return d }) else { return }
        do { try device.flush() } catch { Log.error("flushing \(device.driver.file.path): \(error)") }
        do { try device.close() } catch { Log.error("closing \(device.driver.file.path): \(error)") }
    }
}
