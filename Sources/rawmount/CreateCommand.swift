import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create an empty image (qcow2, qed, vdi, vmdk, vpc, vhdx, raw).",
        discussion: "qemu-img's spellings work too: -o cluster_size=64k,compat=1.1,refcount_bits=16,extended_l2=on,lazy_refcounts=on,preallocation=metadata,table_size=4,subformat=streamOptimized|fixed,force_size=on,block_size=32M,log_size=1M,block_state_zero=off,static=on,backing_file=B,backing_fmt=F; -b and -F. Sizes take k, M, G, T, P, E (or KiB, MiB, ...) and fractions (1.5G); a size that is not a multiple of 512 is rounded up, with a note." + Examples.section("create"))

    @Option(name: [.customShort("f"), .long], help: "Format: qcow2, qed, vdi, vmdk, vpc (VHD), vhdx or raw.", completion: .list(Self.creatable))
    var format: String

    @Option(help: "Cluster size in bytes (QED: power of two, 4 KiB...64 MiB; qcow2: 512...2M; default 64 KiB).")
    var clusterSize: String?

    @Option(help: "qcow2: 1.1 (version 3, default) or 0.10 (version 2).")
    var compat: String = "1.1"

    @Option(help: "qcow2: refcount width, 1, 2, 4, 8, 16, 32 or 64 bits.")
    var refcountBits: UInt64 = 16

    @Flag(help: "qcow2: extended L2 entries (32 subclusters per cluster; clusters of 16K or more).")
    var extendedL2 = false

    @Flag(help: "qcow2: set the lazy_refcounts feature (QEMU then may leave refcounts for a check after a crash).")
    var lazyRefcounts = false

    @Option(help: "qcow2: off (default) or metadata (every L2 table and data cluster allocated up front).")
    var preallocation: String = "off"

    @Option(help: "Clusters per L1/L2 table (QED: 1, 2, 4, 8 or 16).")
    var tableSize: UInt32 = 4

    @Option(help: "VMDK: \(VMDKCreate.Subformat.allCases.map(\.rawValue).joined(separator: ", ")) (default monolithicSparse). VHD (vpc) and VHDX: dynamic (default) or fixed.",
            completion: .list(VMDKCreate.Subformat.allCases.map(\.rawValue) + VHDCreate.Subformat.allCases.map(\.rawValue)))
    var subformat: String?

    @Flag(help: "VHD (vpc): keep the exact size instead of rounding it up to a CHS geometry (qemu-img's force_size).")
    var forceSize = false

    @Option(help: "VHDX: block size, a power of two from 1M to 256M (default by disk size, as qemu-img: 8M up to 1G, 16M up to 100G, 32M up to 32T, then 64M).")
    var blockSize: String?

    @Option(help: "VHDX: log size, whole MiBs (default 1M).")
    var logSize: String?

    @Flag(help: "VHDX: blocks start not present (dynamic) or laid out (fixed) instead of in the zero state (qemu-img's block_state_zero=off).")
    var noBlockStateZero = false

    @Flag(name: .customLong("static"), help: "VDI: allocate every block up front (sparse on the host).")
    var isStatic = false

    @Option(name: [.customShort("b"), .long], help: "Backing file, stored as given (relative names are relative to IMAGE's directory).", completion: .file())
    var backing: String?

    @Option(name: [.customShort("F"), .long], help: "Backing file format (raw is stored as 'no probe').", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var backingFormat: String?

    @Argument(help: "The image to create; an existing image file is replaced, as qemu-img does, unless it is in use or the backing file.", completion: .file())
    var image: String

    @Option(name: .customShort("o"), help: ArgumentHelp("Creation options as qemu-img takes them (key=value,...; see above).", valueName: "options"))
    var creationOptions: [String] = []

    @Flag(name: [.customShort("q"), .long], help: "Print nothing on success (no \"Formatting ...\" line).")
    var quiet = false

    @Argument(help: "Virtual size: bytes or with k, M, G, T, P suffix, or 1.5G (with --backing: the backing image's size when omitted).")
    var size: String?

    func run() throws {
        var c = self
        do { try c.applyCreationOptions() } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
        do { try c.createImage() } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
    }

    /// qemu-img's `-o` names onto the flags; a key this format does not have is refused, as
    /// qemu-img refuses it.
    mutating func applyCreationOptions() throws {
        let fmt = format.lowercased()
        let known: [String: Set<String>] = [
            "qcow2": ["cluster_size", "compat", "refcount_bits", "extended_l2", "lazy_refcounts", "preallocation",
                      "backing_file", "backing_fmt", "compression_type"],
            "qed": ["cluster_size", "table_size", "backing_file", "backing_fmt"],
            "vdi": ["static"],
            "vmdk": ["subformat", "backing_file", "compat6", "hwversion", "adapter_type", "toolsversion", "zeroed_grain"],
            "vpc": ["subformat", "force_size", "preallocation"],
            "vhdx": ["subformat", "block_size", "log_size", "block_state_zero", "preallocation"],
            "raw": ["preallocation"],
        ]
        func onOff(_ key: String, _ v: String) throws -> Bool {
            switch v.lowercased() {
            case "on", "true", "yes": return true
            case "off", "false", "no": return false
            default: throw BlockError.usage("-o \(key)=\(v): on or off")
            }
        }
        for list in creationOptions {
            for item in MountSettings.split(list) {
                let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
                let key = kv[0], value = kv.count == 2 ? kv[1] : "on"
                guard known[fmt]?.contains(key) ?? false else {
                    throw BlockError.usage("-o \(key): not a creation option of \(fmt) (it has: \((known[fmt] ?? []).sorted().joined(separator: ", ")))")
                }
                switch key {
                case "cluster_size": clusterSize = value
                case "compat": compat = value
                case "refcount_bits":
                    guard let n = UInt64(value) else { throw BlockError.usage("-o refcount_bits=\(value): a number") }
                    refcountBits = n
                case "extended_l2": extendedL2 = try onOff(key, value)
                case "lazy_refcounts": lazyRefcounts = try onOff(key, value)
                case "preallocation":
                    if fmt == "raw" || fmt == "vpc" || fmt == "vhdx", value != "off" { throw BlockError.usage("-o preallocation=\(value): \(fmt) images are created sparse here (off)") }
                    preallocation = value
                case "table_size":
                    guard let n = UInt32(value) else { throw BlockError.usage("-o table_size=\(value): a number") }
                    tableSize = n
                case "subformat": subformat = value
                case "static": isStatic = try onOff(key, value)
                case "force_size": forceSize = try onOff(key, value)
                case "block_size": blockSize = value
                case "log_size": logSize = value
                case "block_state_zero": noBlockStateZero = try !onOff(key, value)
                case "backing_file": backing = value
                case "backing_fmt": backingFormat = value
                case "compression_type":
                    guard value == "zlib" else { throw BlockError.usage("-o compression_type=\(value): rawmount creates zlib images only") }
                case "compat6", "zeroed_grain":
                    guard try !onOff(key, value) else { throw BlockError.usage("-o \(key)=on: not supported by rawmount create") }
                default:
                    // adapter_type, hwversion, toolsversion: descriptor text rawmount writes its own way.
                    guard value == "undefined" || value == "ide" else {
                        throw BlockError.usage("-o \(key)=\(value): not supported by rawmount create")
                    }
                }
            }
        }
    }

    /// Creates the image (also for `convert`); errors are thrown, not printed.
    /// Formats `create` (and `convert -O`) write.
    static let creatable = ["qcow2", "qed", "vdi", "vmdk", "vpc", "vhdx", "raw"]

    func createImage() throws {
        do {
            // Refused before anything is printed or opened.
            guard Self.creatable.contains(format.lowercased()) else {
                throw BlockError.usage("create supports -f \(Self.creatable.joined(separator: ", -f "))")
            }
            // As qemu-img does, the backing image is opened: a typo fails now, not at first mount.
            let parent = try backing.map { name in
                let fmt = try parseFormat(backingFormat, what: "backing format")
                do {
                    return try ImageOpener.open(path: PathName.resolve(name, relativeTo: image), options: .init(writable: false, format: fmt, lock: false))
                } catch let e as BlockError where e.isFileNotFound {
                    throw BlockError.usage("backing file \(name): not found (looked at \(PathName.resolve(name, relativeTo: image)))")
                }
            }
            defer { try? parent?.close() }
            guard let asked = try size.map(parseSize) ?? parent?.virtualSize else {
                throw BlockError.usage("give the virtual SIZE (or --backing, whose size is then used)")
            }
            // Disks are whole sectors (qemu-img rounds up too, silently).
            let bytes = (asked + 511) / 512 * 512
            if bytes != asked { printError("rawmount: note: size \(asked) rounded up to \(bytes) (a whole number of 512-byte sectors)") }
            // What can be refused from the options alone is refused before the announcement.
            if format.lowercased() == "vpc" { _ = (try vhdSubformat(), try VHDCreate.layout(size: bytes, forceSize: forceSize)) }
            if format.lowercased() == "vhdx" { _ = try VHDXCreate.validate(size: bytes, options: try vhdxOptions()) }
            let replaced = try existingFileToReplace(parent: parent)
            if !quiet { print(formattingLine(bytes, parentFormat: parent?.driver.info.format)) }
            if replaced != nil {
                // qemu-img create overwrites an existing image; so does rawmount, once it has
                // made sure nothing has it open (its lock) and it is not the backing file.
                guard unlink(image) == 0 else { throw BlockError.io(file: image, operation: "replace", offset: nil, errno: errno) }
            }
            switch format.lowercased() {
            case "qcow2":
                var o = QCOW2Create.Options()
                o.clusterSize = try clusterSize.map(parseSize) ?? 65536
                switch compat {
                case "1.1", "v3": o.version = 3
                case "0.10", "v2": o.version = 2
                default: throw BlockError.usage("--compat must be 1.1 or 0.10, not '\(compat)'")
                }
                o.refcountBits = refcountBits
                o.extendedL2 = extendedL2
                o.lazyRefcounts = lazyRefcounts
                switch preallocation {
                case "off": break
                case "metadata": o.preallocateMetadata = true
                default: throw BlockError.usage("--preallocation must be off or metadata, not '\(preallocation)'")
                }
                if o.preallocateMetadata && backing != nil { throw BlockError.usage("--preallocation metadata and --backing do not go together (as in qemu-img)") }
                o.backing = backing
                o.backingFormat = try parseFormat(backingFormat, what: "backing format")?.rawValue
                    ?? (backing != nil ? parent.map { $0.driver.info.format } : nil)
                try QCOW2Create.create(path: image, size: bytes, options: o)
            case "qed":
                let cs = try clusterSize.map(parseSize) ?? 65536
                guard cs <= UInt64(UInt32.max) else { throw BlockError.usage("--cluster-size \(cs) is too large") }
                try QEDCreate.create(path: image, size: bytes, clusterSize: UInt32(cs), tableSize: tableSize,
                                     backing: backing, backingIsRaw: backingFormat?.lowercased() == "raw")
            case "vmdk":
                guard let sub = VMDKCreate.Subformat(rawValue: subformat ?? "monolithicSparse") else {
                    throw BlockError.usage("unknown VMDK subformat '\(subformat ?? "")'")
                }
                var parentCID: UInt32? = nil
                if let backing, let parent {
                    // Record the parent's CID, so later changes to the parent are noticed.
                    guard let vmdk = parent.driver as? VMDKDriver, let cid = vmdk.descriptor?.cid else {
                        throw BlockError.usage("\(backing): a VMDK parent must itself be a VMDK with a CID")
                    }
                    parentCID = cid
                }
                try VMDKCreate.create(path: image, size: bytes, subformat: sub, backing: backing, parentCID: parentCID)
            case "vdi":
                if backing != nil { throw BlockError.usage("VDI images cannot have a backing file here") }
                try VDICreate.create(path: image, size: bytes, isStatic: isStatic)
            case "vpc":
                if backing != nil { throw BlockError.usage("VHD images cannot have a backing file here (differencing VHDs are not written)") }
                try VHDCreate.create(path: image, size: bytes, subformat: try vhdSubformat(), forceSize: forceSize)
            case "vhdx":
                if backing != nil { throw BlockError.usage("VHDX images cannot have a backing file here (differencing VHDX is not written)") }
                try VHDXCreate.create(path: image, size: bytes, options: try vhdxOptions())
            case "raw":
                if backing != nil { throw BlockError.usage("raw images cannot have a backing file") }
                try ImageFile.createComplete(path: image) { try $0.truncate(to: bytes) }
            default:
                throw BlockError.usage("create supports -f \(Self.creatable.joined(separator: ", -f "))")
            }
        }
    }

    /// The file `image` names, when one exists: a regular file no one has open for writing
    /// and that is not the new image's backing file; anything else is refused.
    func existingFileToReplace(parent: BlockDevice?) throws -> ImageFile? {
        var st = stat()
        guard lstat(image, &st) == 0 else { return nil }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw BlockError.usage("\(image): exists and is not a regular file; create writes new image files only")
        }
        let file = try ImageFile(path: image, writable: false)
        var layer = parent
        while let l = layer {
            if let a = l.driver.file.identity, a == file.identity {
                throw BlockError.usage("\(image): is the backing file of the image to create")
            }
            layer = l.backing
        }
        try ImageLock.acquire(file, writable: true)
        return file
    }

    func vhdxOptions() throws -> VHDXCreate.Options {
        var o = VHDXCreate.Options()
        guard let sub = VHDXCreate.Subformat(rawValue: subformat ?? "dynamic") else {
            throw BlockError.usage("unknown VHDX subformat '\(subformat ?? "")' (dynamic or fixed)")
        }
        o.subformat = sub
        o.blockSize = try blockSize.map(parseSize) ?? 0
        o.logSize = try logSize.map(parseSize) ?? (1 << 20)
        o.blockStateZero = !noBlockStateZero
        return o
    }

    func vhdSubformat() throws -> VHDCreate.Subformat {
        guard let sub = VHDCreate.Subformat(rawValue: subformat ?? "dynamic") else {
            throw BlockError.usage("unknown VHD subformat '\(subformat ?? "")' (dynamic or fixed)")
        }
        return sub
    }

    /// qemu-img create's first line, field for field where the fact is the same.
    func formattingLine(_ size: UInt64, parentFormat: String?) -> String {
        let fmt = format.lowercased()
        var f = ["fmt=\(fmt)"]
        let back = (backing.map { ["backing_file=\($0)"] } ?? []) + ((backingFormat?.lowercased() ?? (backing != nil ? parentFormat : nil)).map { ["backing_fmt=\($0)"] } ?? [])
        let cs = (try? clusterSize.map(parseSize)) ?? 65536
        switch fmt {
        case "qcow2":
            f += ["cluster_size=\(cs)", "extended_l2=\(extendedL2 ? "on" : "off")", "compression_type=zlib", "size=\(size)"] + back
            if preallocation != "off" { f.append("preallocation=\(preallocation)") }
            f += ["lazy_refcounts=\(lazyRefcounts ? "on" : "off")", "refcount_bits=\(refcountBits)"]
            if compat != "1.1" { f.append("compat=\(compat)") }
        case "qed": f += ["size=\(size)"] + back + ["cluster_size=\(cs)", "table_size=\(tableSize)"]
        case "vdi": f += ["size=\(size)", "static=\(isStatic ? "on" : "off")"]
        case "vmdk": f += ["size=\(size)"] + back.prefix(1) + ["compat6=off", "hwversion=undefined", "subformat=\(subformat ?? "monolithicSparse")"]
        case "vpc": f += ["size=\(size)"] + (subformat.map { ["subformat=\($0)"] } ?? []) + (forceSize ? ["force_size=on"] : [])
        case "vhdx":
            f += ["size=\(size)", "log_size=\((try? logSize.map(parseSize)) ?? nil ?? 1 << 20)", "block_size=\((try? blockSize.map(parseSize)) ?? nil ?? 0)"]
            if let subformat { f.append("subformat=\(subformat)") }
            if noBlockStateZero { f.append("block_state_zero=off") }
        default: f += ["size=\(size)"]
        }
        return "Formatting '\(image)', " + f.joined(separator: " ")
    }
}
