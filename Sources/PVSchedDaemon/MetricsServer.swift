import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// The opt-in Prometheus endpoint (`pvsched daemon --metrics HOST:PORT`):
/// `GET /metrics` on a SwiftNIO HTTP/1.1 server with one event-loop thread. It is
/// reachable by anyone who can reach the address, so it holds at most
/// `maxConnections` connections and closes one that stays silent for `idleTimeout`:
/// a client that opens connections and sends nothing cannot exhaust the daemon.
public final class MetricsServer: Sendable {
    private let group: MultiThreadedEventLoopGroup
    private let channel: any Channel
    /// The address actually bound (the port is known even when 0 was asked).
    public let boundAddress: String
    public static let maxConnections = 32
    public static let idleTimeout = TimeAmount.seconds(10)

    public init(host: String, port: Int, exporter: MetricsExporter) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let open = ConnectionCount()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard open.value.add(1, ordering: .relaxed).newValue <= Self.maxConnections else {
                    open.value.subtract(1, ordering: .relaxed)
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in open.value.subtract(1, ordering: .relaxed) }
                return channel.pipeline.addHandler(IdleStateHandler(readTimeout: Self.idleTimeout)).flatMap {
                    channel.pipeline.addHandler(CloseWhenIdle())
                }.flatMap {
                    channel.pipeline.configureHTTPServerPipeline()
                }.flatMap {
                    channel.pipeline.addHandler(MetricsHTTPHandler(exporter: exporter))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        self.group = group
        let port = channel.localAddress?.port ?? port
        boundAddress = "\(host):\(port)"
    }

    public func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }

    /// Parses "HOST:PORT" (IPv4 or a name; "[v6]:port" for IPv6).
    public static func parseAddress(_ text: String) -> (host: String, port: Int)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        return (host, port)
    }
}

/// The endpoint's open connections.
final class ConnectionCount: Sendable { let value = Atomic<Int>(0) }

/// Closes a connection that sent nothing for the idle timeout.
final class CloseWhenIdle: ChannelInboundHandler, Sendable {
    typealias InboundIn = NIOAny
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }
}

/// Answers `GET /metrics` with the exporter's text; everything else 404/405.
final class MetricsHTTPHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    private let exporter: MetricsExporter

    init(exporter: MetricsExporter) { self.exporter = exporter }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let head) = unwrapInboundIn(data) else { return }
        let status: HTTPResponseStatus
        let body: [UInt8]
        var contentType = "text/plain; charset=utf-8"
        if head.method != .GET && head.method != .HEAD {
            status = .methodNotAllowed; body = Array("only GET\n".utf8)
        } else if head.uri.split(separator: "?").first == "/metrics" {
            status = .ok; body = exporter.scrape(); contentType = "text/plain; version=0.0.4; charset=utf-8"
        } else {
            status = .notFound; body = Array("pvsched metrics are at /metrics\n".utf8)
        }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if head.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}
