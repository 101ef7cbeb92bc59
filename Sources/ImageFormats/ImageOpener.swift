import BlockEngine

/// Opens an image file as a `BlockDevice`: probes (or takes) the format, locks, validates,
/// and follows backing files (see `ReferencedFiles` for which files an image may name).
public enum ImageOpener {
    /// Chains as deep as QEMU opens (it opens 1000 in well under a second); each level holds
    /// one descriptor and tables it has read, and loops are caught by file identity.
    public static let maxChainDepth = 1000

    public struct Options: Sendable {
        public var writable: Bool
        public var format: ImageFormat?
        public var lock: Bool
        /// The caller holds this image's lock already, through this descriptor of its own
        /// (kept across steps that open and close the image): the image is not locked again
        /// (its own lock would conflict), its backing files are, it is not treated as a file
        /// others write, and a file at the path other than the one held (replaced since) is
        /// refused before anything reads it.
        public var lockHeldBy: ImageFile?
        /// qcow2: show this internal snapshot (ID or name) instead of the active disk.
        public var snapshot: String?
        /// Told what the user should know about the image: what a repair-on-open fixed (QED
        /// NEED_CHECK), a Bochs base modified after its redolog.
        public var onNote: (@Sendable (String) -> Void)?
        /// A backing file that does not exist is told through `onNote` and left out, the image
        /// opened alone (`info`, as qemu-img info still describes such an image); never for
        /// anything that reads guest data.
        public var toleratesMissingBacking = false
        public init(writable: Bool, format: ImageFormat? = nil, lock: Bool = true, snapshot: String? = nil,
                    onNote: (@Sendable (String) -> Void)? = nil) {
            self.writable = writable; self.format = format; self.lock = lock; self.snapshot = snapshot; self.onNote = onNote
        }
        /// Options for an image whose lock the caller holds through `guardFile` (`lockHeldBy`).
        public static func held(by guardFile: ImageFile, writable: Bool, format: ImageFormat? = nil) -> Options {
            var o = Options(writable: writable, format: format)
            o.lockHeldBy = guardFile
            return o
        }
    }

    public static func open(path: String, options: Options) throws -> BlockDevice {
        try open(path: path, options: options, chain: [])
    }

    /// Every driver's size passes the same bound, whatever its header parser checked.
    static func checkedDevice(_ device: BlockDevice, path: String) throws -> BlockDevice {
        try VirtualSize.checked(device.virtualSize, file: path, field: "virtual size", sectors: false)
        return device
    }

    /// `chain`: the files (device, inode) of the images above this one, child first.
    static func open(path: String, options: Options, chain: [FileIdentity]) throws -> BlockDevice {
        try checkedDevice(try openUnchecked(path: path, options: options, chain: chain), path: path)
    }

    static func openUnchecked(path: String, options: Options, chain: [FileIdentity]) throws -> BlockDevice {
        if chain.count > maxChainDepth {
            throw BlockError.invalid(file: path, field: "backing chain", detail: "deeper than \(maxChainDepth) images")
        }
        // Probe through a read-only descriptor: read-only formats (Bochs) are never opened for
        // writing, so not a byte or timestamp of them changes.
        let readOnlyFile = try ImageFile(path: path, writable: false, sharedWithWriters: !options.lock)
        guard let identity = readOnlyFile.identity else {
            throw BlockError.io(file: path, operation: "fstat", offset: nil, errno: 5 /* EIO */)
        }
        if let held = options.lockHeldBy, !readOnlyFile.isSameFile(as: held) {
            throw BlockError.invalid(file: path, field: "file", detail: "it was replaced by another file after it was locked; nothing was changed")
        }
        if chain.contains(identity) {
            throw BlockError.invalid(file: path, field: "backing chain",
                                     detail: "it loops: this file is already in the chain above it (\(chain.count) images up)")
        }
        let chain = chain + [identity]
        var format = try options.format ?? ImageFormat.probe(readOnlyFile)
        // Split raw is known by its name only; found that way, it is evidence (read-only).
        let splitByName = options.format == nil && format == .raw && SplitRawFormat.detect(path)
        if splitByName { format = .splitraw }
        let opening = format.opening
        // An internal snapshot is shown read-only, so its image is opened read-only.
        let writable = try options.writable && format.supportsWriting && options.snapshot == nil && !splitByName
            && (opening?.takesWrites(readOnlyFile) ?? true)
        let file = writable ? try ReferencedFiles.reopenForWriting(readOnlyFile) : readOnlyFile
        if options.lock && options.lockHeldBy == nil { try ImageLock.acquire(file, writable: writable) }
        if let key = options.snapshot, !(opening?.hasSnapshots ?? false) {
            throw BlockError.usage("\(path): snapshot '\(key)' asked for, but only qcow2 images hold internal snapshots (this is \(format.rawValue))")
        }
        guard let opening else { return BlockDevice(driver: try RawDriver(file: file, probed: options.format == nil)) }
        return try opening.open(OpenRequest(path: path, file: file, options: options, chain: chain))
    }

    /// Backing files (QED backing names, VMDK parentFileNameHint) are relative to the child.
    /// nil only when the file does not exist and the options tolerate that.
    static func openBacking(_ name: String, of child: String, format: ImageFormat?, options: Options, chain: [FileIdentity]) throws -> BlockDevice? {
        let path = PathName.resolve(name, relativeTo: child)
        do {
            var o = Options(writable: false, format: format, lock: options.lock, onNote: options.onNote)
            o.toleratesMissingBacking = options.toleratesMissingBacking
            return try open(path: path, options: o, chain: chain)
        } catch let e as BlockError where e.isFileNotFound {
            let text = "backing file '\(name)' not found (looked at \(path))"
            if options.toleratesMissingBacking {
                options.onNote?("\(child): \(text)")
                return nil
            }
            throw BlockError.invalid(file: child, field: "backing file", detail: "'\(name)' not found (looked at \(path))")
        }
    }
}
