import CNbdkit
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// The image this nbdkit process serves (one per process, as nbdkit loads a plugin once).
let served = ServedImage()

/// nbdkit's logging: errors go to its log (stderr in the foreground, syslog when forked).
enum Log {
    static func error(_ message: String) { message.withCString { rm_nbdkit_error($0) } }
    static func debug(_ message: String) { message.withCString { rm_nbdkit_debug($0) } }
}

/// Reports `error` to nbdkit (message and the engine's errno) and returns -1 for the callback.
private func fail(_ error: Error, _ doing: String) -> Int32 {
    let code = (error as? BlockError)?.errnoValue ?? EIO
    Log.error("\(doing): \((error as? BlockError)?.description ?? "\(error)")")
    nbdkit_set_error(code)
    return -1
}

private func text(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

/// Every callback finds the image through `served`; the per-connection handle carries nothing.
private var connectionHandle: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: 0x1)! }

private func withDevice(_ doing: String, _ body: (BlockDevice) throws -> Void) -> Int32 {
    guard let device = served.device else {
        nbdkit_set_error(EIO)
        Log.error("\(doing): the image is not open")
        return -1
    }
    do { try body(device); return 0 } catch { return fail(error, doing) }
}

private func flag(_ flags: UInt32, _ bit: Int32) -> Bool { flags & UInt32(bit) != 0 }

@_cdecl("plugin_init")
public func pluginInit() -> UnsafeMutablePointer<nbdkit_plugin> {
    let p = UnsafeMutablePointer<nbdkit_plugin>.allocate(capacity: 1)
    p.initialize(to: nbdkit_plugin())
    p.pointee._struct_size = UInt64(MemoryLayout<nbdkit_plugin>.size)
    p.pointee._api_version = 2
    p.pointee._thread_model = Int32(NBDKIT_THREAD_MODEL_PARALLEL)
    p.pointee.name = text("rawmount")
    p.pointee.longname = text("rawmount: qcow2, QED, VDI, VMDK, Bochs and raw images through rawmount's engine")
    p.pointee.version = text("0.5.0")
    p.pointee.description = text("Serves the guest disk of any image rawmount reads, and writes the formats it writes.")
    p.pointee.magic_config_key = text("image")
    p.pointee.config_help = text("""
        image=FILE           The disk image (any format rawmount reads; the key may be left out).
        format=FMT           raw, qed, vdi, bochs, vmdk or qcow2 (probed when omitted).
        readonly=true        Open the image read-only (also take -r).
        snapshot=ID|NAME     qcow2: serve an internal snapshot (read-only).
        force-share=true     With readonly=true: take no image locks.
        """)
    p.pointee.errno_is_preserved = 0

    p.pointee.config = { key, value in
        guard let key, let value else { return -1 }
        do { try served.configure(String(cString: key), String(cString: value)); return 0 } catch {
            Log.error("\(error)"); return -1
        }
    }
    p.pointee.config_complete = {
        do { try served.checkComplete(); return 0 } catch { Log.error("\(error)"); return -1 }
    }
    // Before nbdkit forks: only a look at the file, so a typo fails while the terminal is
    // still there. The engine opens after the fork (its threads would not survive one).
    p.pointee.get_ready = {
        guard let image = served.settings.withLock({ $0.image }) else { return -1 }
        guard access(image, R_OK) == 0 else {
            Log.error("\(image): cannot open the image: \(String(cString: strerror(errno)))")
            return -1
        }
        return 0
    }
    p.pointee.after_fork = {
        do { try served.open(); return 0 } catch { return fail(error, "opening the image") }
    }
    p.pointee.cleanup = { served.close() }
    p.pointee.thread_model = { Int32(NBDKIT_THREAD_MODEL_PARALLEL) }

    p.pointee.open = { _ in served.device == nil ? nil : connectionHandle }
    p.pointee.close = { _ in }
    p.pointee.get_size = { _ in Int64(served.device?.virtualSize ?? 0) }
    p.pointee.can_write = { _ in (served.device?.isWritable ?? false) ? 1 : 0 }
    p.pointee.can_flush = { _ in 1 }
    p.pointee.is_rotational = { _ in 0 }
    p.pointee.can_trim = { _ in (served.device?.isWritable ?? false) ? 1 : 0 }
    p.pointee.can_zero = { _ in (served.device?.isWritable ?? false) ? 1 : 0 }
    p.pointee.can_fast_zero = { _ in 1 }
    p.pointee.can_fua = { _ in Int32(NBDKIT_FUA_NATIVE) }
    // One engine behind every connection: a flush on any of them covers all.
    p.pointee.can_multi_conn = { _ in 1 }
    p.pointee.can_extents = { _ in 1 }
    p.pointee.can_cache = { _ in Int32(NBDKIT_CACHE_EMULATE) }

    p.pointee.pread = { _, buf, count, offset, _ in
        withDevice("read of \(count) bytes at \(offset)") { d in
            try d.read(into: UnsafeMutableRawBufferPointer(start: buf, count: Int(count)), at: offset)
        }
    }
    p.pointee.pwrite = { _, buf, count, offset, flags in
        withDevice("write of \(count) bytes at \(offset)") { d in
            try d.write(UnsafeRawBufferPointer(start: buf, count: Int(count)), at: offset)
            if flag(flags, NBDKIT_FLAG_FUA) { try d.flush() }
        }
    }
    p.pointee.flush = { _, _ in withDevice("flush") { try $0.flush() } }
    p.pointee.trim = { _, count, offset, flags in
        withDevice("trim of \(count) bytes at \(offset)") { d in
            try d.zero(at: offset, length: UInt64(count), deallocate: true)
            if flag(flags, NBDKIT_FLAG_FUA) { try d.flush() }
        }
    }
    p.pointee.zero = { _, count, offset, flags in
        let fast = flag(flags, NBDKIT_FLAG_FAST_ZERO)
        guard let d = served.device else { nbdkit_set_error(EIO); return -1 }
        do {
            try d.zero(at: offset, length: UInt64(count), deallocate: flag(flags, NBDKIT_FLAG_MAY_TRIM), fast: fast)
            if flag(flags, NBDKIT_FLAG_FUA) { try d.flush() }
            return 0
        } catch let e as BlockError where fast && e.errnoValue == EOPNOTSUPP {
            // The client writes the zeros itself; not an error worth logging.
            nbdkit_set_error(ENOTSUP)
            return -1
        } catch {
            return fail(error, "zeroing of \(count) bytes at \(offset)")
        }
    }
    // base:allocation as qemu-nbd reports it: data, or a hole that reads as zeros.
    p.pointee.extents = { _, count, offset, flags, extents in
        withDevice("extents of \(count) bytes at \(offset)") { d in
            let end = min(offset + UInt64(count), d.virtualSize)
            let one = flag(flags, NBDKIT_FLAG_REQ_ONE)
            var pending: (start: UInt64, length: UInt64, type: UInt32)?
            struct Enough: Error {}
            func add(_ e: (start: UInt64, length: UInt64, type: UInt32)) throws {
                guard nbdkit_add_extent(extents, e.start, e.length, e.type) == 0 else {
                    throw BlockError.io(file: d.driver.file.path, operation: "add extent", offset: e.start, errno: errno)
                }
            }
            do {
                try AllocationMap.walk(d, from: offset, to: end) { entry in
                    let type: UInt32 = entry.data ? 0 : UInt32(NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO)
                    if var p = pending, p.type == type { p.length += entry.length; pending = p; return }
                    if let p = pending { try add(p); if one { throw Enough() } }
                    pending = (entry.start, entry.length, type)
                }
            } catch is Enough { return }
            if let p = pending { try add(p) }
        }
    }
    return p
}
