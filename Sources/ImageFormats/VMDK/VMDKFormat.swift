import BlockEngine

extension ImageFormat { public static let vmdk = ImageFormat(name: "vmdk") }

/// VMDK in the format registry: sparse files and descriptors with their extents (opened
/// under `ReferencedFiles`' rules), and a parent named by parentFileNameHint, which must be
/// a VMDK whose CID matches, as QEMU requires.
enum VMDKFormat: FormatOpening {
    static let format = ImageFormat.vmdk
    static let writes = true
    static func probe(_ head: [UInt8]) -> Bool { VMDKSparseHeader.probe(head) || VMDKDescriptor.probe(head) }

    static func open(_ r: OpenRequest) throws -> BlockDevice {
        // A file named twice (or the descriptor named as an extent) is opened once, so its
        // locks do not conflict with themselves; the driver decides if that is safe to write.
        var opened: [FileIdentity: ImageFile] = r.file.identity.map { [$0: r.file] } ?? [:]
        let lock = r.options.lock, writable = r.writable, path = r.path
        let driver = try VMDKDriver(file: r.file, extentFiles: VMDKExtentFiles(
            open: { try ReferencedFiles.openPart($0, of: path, writable: writable, shared: !lock) },
            adopt: { f in
                guard let id = f.identity else { return (f, true) }
                if let earlier = opened[id] { return (earlier, false) }
                opened[id] = f
                return (f, true)
            },
            lock: { f in if lock { try ImageLock.acquire(f, writable: f.isWritable) } }))
        guard let hint = driver.parentFileNameHint else { return BlockDevice(driver: driver) }
        guard let parent = try r.backing(hint, format: nil) else { return BlockDevice(driver: driver) }
        // QEMU refuses a VMDK parent of another format; a parentFileNameHint naming any host
        // file (/etc/shadow) would otherwise be shown as the disk under it.
        guard let p = parent.driver as? VMDKDriver else {
            throw BlockError.invalid(file: path, field: "parentFileNameHint",
                                     detail: "the parent \(hint) is a \(parent.driver.info.format) image; a VMDK's parent must be a VMDK (QEMU refuses others too)")
        }
        // A parent whose content changed since the child was made would silently show wrong
        // data; QEMU refuses such reads too.
        if let want = driver.descriptor?.parentCID, p.descriptor?.cid != want {
            let have = p.descriptor?.cid.map { String($0, radix: 16) } ?? "no readable CID"
            throw BlockError.invalid(file: path, field: "parentCID",
                                     detail: "\(String(want, radix: 16)) does not match the parent \(hint) (\(have))")
        }
        return BlockDevice(driver: driver, backing: parent)
    }
}
