// Emit an event in the same transaction as the business write (Java, JDBC).
// java -cp /usr/share/java/postgresql.jar docs/examples/Emit.java "jdbc:postgresql://host:5432/db?user=..."
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;

public class Emit {
    public static void main(String[] args) throws Exception {
        try (Connection connection = DriverManager.getConnection(args[0])) {
            connection.setAutoCommit(false);
            long orderId;
            try (PreparedStatement insert = connection.prepareStatement(
                    "INSERT INTO orders (customer, total) VALUES (?, ?) RETURNING id")) {
                insert.setString(1, "java");
                insert.setBigDecimal(2, new java.math.BigDecimal("42.00"));
                try (ResultSet rows = insert.executeQuery()) {
                    rows.next();
                    orderId = rows.getLong(1);
                }
            }
            try (PreparedStatement emit = connection.prepareStatement(
                    "SELECT outbox.emit(?, ?, ?::jsonb)")) {
                emit.setString(1, "order.created");
                emit.setLong(2, orderId);                       // bigint aggregate id, no cast
                emit.setString(3, "{\"id\": " + orderId + ", \"customer\": \"java\"}");
                try (ResultSet rows = emit.executeQuery()) {
                    rows.next();
                    System.out.println(rows.getString(1));
                }
            }
            connection.commit();                                // or rollback(): no event
        }
    }
}
