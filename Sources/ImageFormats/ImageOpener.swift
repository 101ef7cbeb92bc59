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
        /// qcow2: show this internal snapshot (ID or name) instead of the active disk.
        public var snapshot: String?
        /// Told what the user should know about the image: what a repair-on-open fixed (QED
        /// NEED_CHECK), a Bochs base modified after its redolog.
        public var onNote: (@Sendable (String) -> Void)?
        public init(writable: Bool, format: ImageFormat? = nil, lock: Bool = true, snapshot: String? = nil,
                    onNote: (@Sendable (String) -> Void)? = nil) {
            self.writable = writable; self.format = format; self.lock = lock; self.snapshot = snapshot; self.onNote = onNote
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
        if chain.contains(identity) {
            throw BlockError.invalid(file: path, field: "backing chain",
                                     detail: "it loops: this file is already in the chain above it (\(chain.count) images up)")
        }
        let chain = chain + [identity]
        let format = try options.format ?? ImageFormat.probe(readOnlyFile)
        let differencing = try isVDIDifferencing(readOnlyFile, format)
        // An internal snapshot is shown read-only, so its image is opened read-only.
        let writable = options.writable && format.supportsWriting && !differencing && options.snapshot == nil
        let file = writable ? try ReferencedFiles.reopenForWriting(readOnlyFile) : readOnlyFile
        if options.lock { try ImageLock.acquire(file, writable: writable) }
        if let key = options.snapshot, format != .qcow2 {
            throw BlockError.usage("\(path): snapshot '\(key)' asked for, but only qcow2 images hold internal snapshots (this is \(format.rawValue))")
        }
        switch format {
        case .vdi:
            let driver = try VDIDriver(file: file) { report in
                options.onNote?("\(path): allocation did not match the block map (a crash?); repaired: \(report)")
            }
            guard driver.header.isDifferencing else { return BlockDevice(driver: driver) }
            let parentPath = try VDIParent.find(for: path, header: driver.header)
            let parent = try open(path: parentPath, options: .init(writable: false, format: .vdi, lock: options.lock), chain: chain)
            return BlockDevice(driver: driver, backing: parent)
        case .bochs:
            return try openBochs(file, path: path, options: options, chain: chain)
        case .vmdk:
            // A file named twice (or the descriptor named as an extent) is opened once, so its
            // locks do not conflict with themselves; the driver decides if that is safe to write.
            var opened: [FileIdentity: ImageFile] = file.identity.map { [$0: file] } ?? [:]
            let lock = options.lock
            let driver = try VMDKDriver(file: file, extentFiles: VMDKExtentFiles(
                open: { try ReferencedFiles.openPart($0, of: path, writable: writable, shared: !lock) },
                adopt: { f in
                    guard let id = f.identity else { return (f, true) }
                    if let earlier = opened[id] { return (earlier, false) }
                    opened[id] = f
                    return (f, true)
                },
                lock: { f in if lock { try ImageLock.acquire(f, writable: f.isWritable) } }))
            var parent: BlockDevice? = nil
            if let hint = driver.parentFileNameHint {
                parent = try openBacking(hint, of: path, format: nil, options: options, chain: chain)
                // QEMU refuses a VMDK parent of another format; a parentFileNameHint naming
                // any host file (/etc/shadow) would otherwise be shown as the disk under it.
                if let p = parent, !(p.driver is VMDKDriver) {
                    throw BlockError.invalid(file: path, field: "parentFileNameHint",
                                             detail: "the parent \(hint) is a \(p.driver.info.format) image; a VMDK's parent must be a VMDK (QEMU refuses others too)")
                }
                // A parent whose content changed since the child was made would silently
                // show wrong data; QEMU refuses such reads too.
                if let p = parent?.driver as? VMDKDriver, let want = driver.descriptor?.parentCID,
                   p.descriptor?.cid != want {
                    let have = p.descriptor?.cid.map { String($0, radix: 16) } ?? "no readable CID"
                    throw BlockError.invalid(file: path, field: "parentCID",
                                             detail: "\(String(want, radix: 16)) does not match the parent \(hint) (\(have))")
                }
            }
            return BlockDevice(driver: driver, backing: parent)
        case .qcow2:
            let driver = try QCOW2Driver(file: file, snapshot: options.snapshot) { note in options.onNote?("\(path): \(note)") }
            var backing: BlockDevice? = nil
            if let name = driver.header.backingName {
                // The backing-format extension names the format; QEMU probes only without it.
                let format = driver.header.backingFormat.flatMap { ImageFormat(rawValue: $0) }
                backing = try openBacking(name, of: path, format: format, options: options, chain: chain)
            }
            return BlockDevice(driver: driver, backing: backing)
        case .raw:
            return BlockDevice(driver: try RawDriver(file: file, probed: options.format == nil))
        case .qed:
            let driver = try QEDDriver(file: file) { report in
                options.onNote?("\(path): image was not closed cleanly (NEED_CHECK); checked: \(report)")
            }
            var backing: BlockDevice? = nil
            if let name = driver.backingName {
                let noProbe = driver.header.features & QEDHeader.featureBackingNoProbe != 0
                backing = try openBacking(name, of: path, format: noProbe ? .raw : nil, options: options, chain: chain)
            }
            return BlockDevice(driver: driver, backing: backing)
        }
    }

    /// Bochs images: a growing redolog stands alone; an undoable one reads through its base
    /// (<base>.redolog); a sparse image stacks on the one numbered below it, as Bochs does.
    static func openBochs(_ file: ImageFile, path: String, options: Options, chain: [FileIdentity]) throws -> BlockDevice {
        let head = try file.readBytes(count: 4, at: 0, what: "Bochs header")
        guard BochsSparseHeader.hasMagic(head) else {
            let driver = try BochsDriver(file: file)
            guard driver.header.isUndoable else { return BlockDevice(driver: driver) }
            guard let basePath = BochsDriver.basePath(ofRedolog: path) else {
                throw BlockError.invalid(file: path, field: "base image",
                                         detail: "this Bochs undoable redolog reads through its base image, which Bochs finds by name (<base>.redolog); rename it so")
            }
            do {
                let base = try open(path: basePath, options: .init(writable: false, lock: options.lock), chain: chain)
                // Bochs refuses a base whose mtime is not the redolog's timestamp; evidence
                // copies often lose mtimes, so rawmount reads them and says so.
                if let stamp = driver.header.timestamp, stamp != 0, let st = base.driver.file.fileStatus(),
                   case let baseStamp = BochsHeader.fatTimestamp(st.st_mtim.tv_sec), baseStamp != stamp {
                    options.onNote?("\(path): its base \(basePath) was modified after the redolog was made "
                        + "(redolog \(BochsHeader.fatText(stamp)), base \(BochsHeader.fatText(baseStamp))); "
                        + "Bochs would refuse the pair, rawmount shows them as they are")
                }
                return BlockDevice(driver: driver, backing: base)
            } catch let e as BlockError where e.isFileNotFound {
                throw BlockError.invalid(file: path, field: "base image", detail: "'\(basePath)' not found (an undoable redolog reads through it)")
            }
        }
        let driver = try BochsSparseDriver(file: file)
        guard let parentPath = BochsSparseDriver.parentPath(of: path) else { return BlockDevice(driver: driver) }
        let parent = try open(path: parentPath, options: .init(writable: false, lock: options.lock), chain: chain)
        // Bochs refuses a stack whose layers differ in page size or page count.
        guard let p = parent.driver as? BochsSparseDriver, p.header.pageSize == driver.header.pageSize,
              p.header.pages == driver.header.pages else {
            throw BlockError.invalid(file: path, field: "parent image",
                                     detail: "\(parentPath) (which Bochs stacks this image on, by name) is not a Bochs sparse image with the same page size and page count")
        }
        return BlockDevice(driver: driver, backing: parent)
    }

    /// VirtualBox differencing images are served read-only, so they are opened read-only.
    static func isVDIDifferencing(_ file: ImageFile, _ format: ImageFormat) throws -> Bool {
        guard format == .vdi, try file.size() >= 0x50 else { return false }
        return le32(try file.readBytes(count: 0x50, at: 0, what: "VDI header"), 0x4C) == 4
    }

    /// Backing files (QED backing names, VMDK parentFileNameHint) are relative to the child.
    static func openBacking(_ name: String, of child: String, format: ImageFormat?, options: Options, chain: [FileIdentity]) throws -> BlockDevice {
        let path = PathName.resolve(name, relativeTo: child)
        do {
            return try open(path: path, options: .init(writable: false, format: format, lock: options.lock), chain: chain)
        } catch let e as BlockError where e.isFileNotFound {
            throw BlockError.invalid(file: child, field: "backing file", detail: "'\(name)' not found (looked at \(path))")
        }
    }
}
